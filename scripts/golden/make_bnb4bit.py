#!/usr/bin/env python3
"""A tiny pre-quantized bitsandbytes checkpoint, as users download `*-bnb-4bit` models.

    /work/pyenv/bin/python scripts/golden/make_bnb4bit.py [--src tests/golden/dense_kv]
                                                         [--out tests/golden/dense_kv-bnb4bit]

It loads the golden source checkpoint with the REAL transformers + bitsandbytes
(BitsAndBytesConfig(load_in_4bit, nf4, double quant), on the CPU, float32 as the source stores)
and writes it back with `save_pretrained`: config.json gains `quantization_config`, every
nn.Linear becomes Linear4bit and is stored as a U8 `[(n+1)/2, 1]` weight plus `.absmax` (U8),
`.quant_map`, `.nested_absmax`, `.nested_quant_map` and `.quant_state.bitsandbytes__nf4`.
Norms, embeddings, layer_scalar (and MoE experts, which are not nn.Linear) stay float32.

tests/test_bnb4bit.cpp loads it and compares with quantizing the source in C++.

Deterministic: one CPU thread (torch's CPU sum order depends on the split).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import safetensors
import torch
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import bitsandbytes

REPO = Path(__file__).resolve().parents[2]


def register_in_manifest(out: Path) -> None:
    """Lists the fixture's files in tests/golden/MANIFEST.sha256 (tests/cli/golden_manifest.sh)."""
    golden = REPO / "tests/golden"
    manifest = golden / "MANIFEST.sha256"
    prefix = out.relative_to(golden).as_posix() + "/"
    lines = [l for l in manifest.read_text().splitlines() if not l.split("  ", 1)[1].startswith(prefix)]
    for p in sorted(out.iterdir()):
        lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(golden).as_posix()}")
    manifest.write_text("\n".join(sorted(lines, key=lambda l: Path(l.split("  ", 1)[1]).parts)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(REPO / "tests/golden/dense_kv"))
    ap.add_argument("--out", default=str(REPO / "tests/golden/dense_kv-bnb4bit"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    src, out = Path(args.src), Path(args.out)

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config, device_map="cpu",
                                                 dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bitsandbytes.nn.Linear4bit), type(q)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "VERSIONS.json").write_text(json.dumps({
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        "safetensors": safetensors.__version__, "source": str(src.relative_to(REPO)),
        "generator": "scripts/golden/make_bnb4bit.py"}, indent=2) + "\n")
    for p in tmp.iterdir():
        p.chmod(0o644)  # save_pretrained writes model.safetensors 0600
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    register_in_manifest(out)

    with safetensors.safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    packed = [k for k in keys if k.endswith(".quant_state.bitsandbytes__nf4")]
    size = (out / "model.safetensors").stat().st_size
    print(f"{out}: {len(keys)} tensors, {len(packed)} Linear4bit weights, {size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
