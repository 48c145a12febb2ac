"""PEFT's merge_and_unload on models/tiny with the torchless-written adapter of
tests/golden/peft_roundtrip, in the base's bf16 and (base upcast) in fp32, recorded for
tests/test_merge.cpp: per-tensor probes [sum, sum of squares, sum of g_i*cos(0.37 i)] of every
merged tensor, and the full merged q_proj/down_proj of layer 0 and per_layer_model_projection.

  python scripts/golden/make_merge_golden.py     (after check_peft_loads_torchless.py)
"""
import json
from pathlib import Path

import peft
import safetensors.torch
import torch
from peft import PeftModel
from transformers import Gemma4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "merge"
FULL = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.per_layer_model_projection.weight"]


def probes(t: torch.Tensor) -> list:
    f = t.detach().double().reshape(-1)
    c = torch.cos(0.37 * torch.arange(f.numel(), dtype=torch.float64))
    return [f.sum().item(), (f * f).sum().item(), (f * c).sum().item()]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    record, full = {"peft": peft.__version__, "torch": torch.__version__}, {}
    for name, dtype in [("bf16", torch.bfloat16), ("f32", torch.float32)]:
        base = Gemma4ForCausalLM.from_pretrained(str(ROOT / "models/tiny"), dtype=dtype)
        merged = PeftModel.from_pretrained(base, str(ROOT / "tests/golden/peft_roundtrip")).merge_and_unload()
        sd = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
        record[name] = {k: probes(v) for k, v in sd.items()}
        for k in FULL:
            full[f"{name}/{k}"] = sd[k].contiguous().clone()
    # torchless-merge's output loads in transformers and holds PEFT's merged weights.
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(ROOT / "build/torchless-merge"), "--base", str(ROOT / "models/tiny"), "--adapter",
                        str(ROOT / "tests/golden/peft_roundtrip"), "--out", f"{tmp}/merged"], check=True)
        ours = Gemma4ForCausalLM.from_pretrained(f"{tmp}/merged", dtype=torch.bfloat16).state_dict()
        base = Gemma4ForCausalLM.from_pretrained(str(ROOT / "models/tiny"), dtype=torch.bfloat16)
        peft_sd = PeftModel.from_pretrained(base, str(ROOT / "tests/golden/peft_roundtrip")).merge_and_unload().state_dict()
        differing = [k for k in peft_sd if not torch.equal(peft_sd[k], ours[k])]
        record["torchless_merge_loads_in_transformers"] = True
        record["torchless_merge_tensors_differing_from_peft_bf16"] = differing
    (OUT / "probes.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    safetensors.torch.save_file(full, str(OUT / "full.safetensors"), metadata={"format": "pt"})
    print("merge golden written")


if __name__ == "__main__":
    main()
