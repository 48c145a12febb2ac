"""torchless-surgery prune's output loads in transformers, and tokens whose routing avoided the
pruned experts give the same logits there as the unpruned model. Records the result in
tests/golden/prune/check.json (the C++ test Prune.* checks the same within torchless).

  python scripts/golden/check_prune_loads.py     (after bash scripts/build.sh)
"""
import json
import subprocess
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from transformers import Gemma4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/golden/moe"


def main():
    ids = safetensors.torch.load_file(str(SRC / "forward.safetensors"))["input_ids"][:1, :3].contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        safetensors.torch.save_file({"input_ids": ids}, f"{tmp}/calib.safetensors", metadata={"format": "pt"})
        subprocess.run([str(ROOT / "build/torchless-surgery"), "prune", str(SRC), f"{tmp}/pruned", "--keep", "6",
                        "--protect", "8", "--calibration-ids", f"{tmp}/calib.safetensors"], check=True,
                       stdout=subprocess.DEVNULL)
        pruned = Gemma4ForCausalLM.from_pretrained(f"{tmp}/pruned", dtype=torch.float32).eval()
        base = Gemma4ForCausalLM.from_pretrained(str(SRC), dtype=torch.float32).eval()
        with torch.no_grad():
            a, b = pruned(input_ids=ids).logits, base(input_ids=ids).logits
        diff = ((a - b).abs().max() / b.abs().max()).item()
        drop = json.loads(Path(f"{tmp}/pruned/expert_drop_map.json").read_text())
    assert pruned.config.num_experts == 6 and diff <= 1e-5, diff
    out = ROOT / "tests/golden/prune"
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps({"loads_in_transformers": True, "num_experts": 6,
                                                "calibration_tokens_logits_rel_diff": diff,
                                                "kept_layer0": drop["layers"]["0"]["kept"]}, indent=2) + "\n")
    print(f"pruned model loads in transformers; calibration tokens' logits differ by {diff:.3g} (relative)")


if __name__ == "__main__":
    main()
