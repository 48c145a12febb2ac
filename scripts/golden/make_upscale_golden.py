"""PLE-aware passthrough upscale of the tiny E4B-like model, done independently in Python:
the layer slices 0:6,2:8,8:12 (12 → 16 layers; the KV-shared tail 8–11 kept at the end) are
applied to the state dict by hand (layers renamed, the per-layer-embedding column blocks and
projection row blocks re-laid, layer_types / num_kv_shared_layers / per_layer_config
rewritten), loaded into transformers, and its logits recorded. torchless-surgery upscale's
output must load in transformers and give the same logits (asserted here); the C++ test
Upscale.MatchesPythonResequencing recomputes them with torchless.

  python scripts/golden/make_upscale_golden.py      (after bash scripts/build.sh)
"""
import json
import subprocess
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/golden/e4b"
OUT = ROOT / "tests/golden/upscale"
SLICES = [(0, 6), (2, 8), (8, 12)]


def resequence():
    cfg = json.loads((SRC / "config.json").read_text())
    sd = safetensors.torch.load_file(str(SRC / "model.safetensors"))
    src_of = [j for a, b in SLICES for j in range(a, b)]
    L, M, P = cfg["num_hidden_layers"], len(src_of), cfg["hidden_size_per_layer_input"]
    out = {}
    for k, v in sd.items():
        if k.startswith("model.layers."):
            continue
        if k == "model.embed_tokens_per_layer.weight":
            v = torch.cat([v[:, j * P:(j + 1) * P] for j in src_of], dim=1)
        elif k == "model.per_layer_model_projection.weight":
            v = torch.cat([v[j * P:(j + 1) * P] for j in src_of], dim=0)
        out[k] = v
    for i, j in enumerate(src_of):
        for k, v in sd.items():
            pre = f"model.layers.{j}."
            if k.startswith(pre):
                out[f"model.layers.{i}." + k[len(pre):]] = v
    shared_src = set(range(L - cfg["num_kv_shared_layers"], L))
    cfg["num_hidden_layers"] = M
    cfg["layer_types"] = [cfg["layer_types"][j] for j in src_of]
    cfg["num_kv_shared_layers"] = sum(j in shared_src for j in src_of)
    if cfg.get("per_layer_config"):
        old = {int(k): v for k, v in cfg["per_layer_config"].items()}
        new = {i: old[j] for i, j in enumerate(src_of) if j in old}
        w = len(str(max(new)))
        cfg["per_layer_config"] = {str(i).zfill(w): v for i, v in new.items()}
    return cfg, out


def main():
    cfg, sd = resequence()
    cfg.pop("transformers_version", None)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model = model.float().eval()
    ids = safetensors.torch.load_file(str(SRC / "forward.safetensors"))["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(ROOT / "build/torchless-surgery"), "upscale", str(SRC), f"{tmp}/up", "--slices",
                        ",".join(f"{a}:{b}" for a, b in SLICES)], check=True, stdout=subprocess.DEVNULL)
        ours = Gemma4ForCausalLM.from_pretrained(f"{tmp}/up", dtype=torch.float32).eval()
        with torch.no_grad():
            ours_logits = ours(input_ids=ids).logits.float()
        diff = (ours_logits - logits).abs().max().item()
        assert diff == 0.0, f"torchless-surgery upscale differs from the Python re-sequencing by {diff}"
    OUT.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"input_ids": ids, "logits": logits.contiguous()}, str(OUT / "logits.safetensors"),
                                metadata={"format": "pt"})
    (OUT / "README.md").write_text(
        "Logits of tests/golden/e4b upscaled with slices 0:6,2:8,8:12, re-sequenced independently in\n"
        "Python and run by transformers (scripts/golden/make_upscale_golden.py). torchless-surgery\n"
        "upscale's output loaded in transformers gave identical logits (difference 0).\n")
    print("upscale golden written; torchless-surgery upscale loads in transformers with identical logits")


if __name__ == "__main__":
    main()
