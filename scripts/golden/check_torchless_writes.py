"""Checks that checkpoints written by torchless load in the Python `safetensors` library and
in transformers and hold the same tensors, then keeps those exact bytes as a fixture.

Run after building (`bash scripts/build.sh`):  python scripts/golden/check_torchless_writes.py
It writes tests/golden/torchless_written/ (the verified bytes, which the C++ test
Checkpoints.ConvertWritesTheBytesPythonVerified regenerates and compares) and
tests/golden/torchless_written.json (what was checked, with versions).
"""
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
from transformers import Gemma4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
TOOL = ROOT / "build" / "torchless-surgery"


def load_all(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        out.update(safetensors.torch.load_file(str(f)))
    return out


def main():
    src = GOLDEN / "e4b"
    record = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "safetensors": safetensors.__version__}, "checks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, shard, torch_dtype in [("bf16", "300KB", torch.bfloat16), ("f32", "5GB", torch.float32)]:
            out = Path(tmp) / f"e4b_{dtype}"
            subprocess.run([str(TOOL), "convert", str(src), str(out), "--dtype", dtype,
                            "--max-shard-size", shard], check=True)
            orig, written = load_all(src), load_all(out)
            assert orig.keys() == written.keys(), "tensor names differ"
            for k in orig:
                assert written[k].dtype == torch_dtype, (k, written[k].dtype)
                assert torch.equal(written[k], orig[k].to(torch_dtype)), k
            index = out / "model.safetensors.index.json"
            if index.exists():
                wm = json.loads(index.read_text())["weight_map"]
                assert set(wm) == set(orig), "index does not name every tensor"
            model = Gemma4ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            base = Gemma4ForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            ids = torch.arange(2, 26).reshape(1, 24) % base.config.vocab_size
            with torch.no_grad():
                # Round the saved weights only (non-persistent buffers such as inv_freq stay fp32).
                for t in base.state_dict().values():
                    t.copy_(t.to(torch_dtype).to(torch.float32))
                a, b = model(input_ids=ids).logits, base(input_ids=ids).logits
            assert torch.equal(a, b), f"{dtype}: logits differ by {(a - b).abs().max()}"
            record["checks"].append({"dtype": dtype, "max_shard_size": shard,
                                     "files": sorted(p.name for p in out.iterdir()),
                                     "tensors_equal": True, "transformers_logits_equal": True})
            if dtype == "bf16":
                dest = GOLDEN / "torchless_written"
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(out, dest)
    (GOLDEN / "torchless_written.json").write_text(json.dumps(record, indent=2) + "\n")
    print("torchless-written checkpoints verified:", [c["dtype"] for c in record["checks"]])


if __name__ == "__main__":
    main()
