#!/usr/bin/env python3
"""NF4 golden fixtures for tests/test_nf4.cpp, from the REAL bitsandbytes (CPU backend).

    /tmp/gvenv/bin/pip install bitsandbytes==0.50.2
    /tmp/gvenv/bin/python scripts/golden/make_nf4_golden.py [--out DIR]   # → tests/golden/nf4/

Two kinds of reference per case (see tests/golden/nf4/README.md):

* `bnb.*`: what bitsandbytes' CPU backend writes (quantize_4bit / dequantize_4bit).
* `ref.*`: the CUDA-kernel semantics (kQuantizeBlockwise + dQuantizeNF4 / dQuantize<0>,
  /work/shared/docs/formats.md §1.2-1.3), ported literally to numpy float32 below, because
  bnb's CPU path differs from its CUDA kernel in four places: 4 of the 15 thresholds (1 ulp),
  all-zero blocks, the partial last block (divide instead of reciprocal-multiply), and the
  8-bit nested codes (the CPU path looks them up in a 65536-entry table). Only written
  where it differs from `bnb.*`. Dequantized `ref` outputs come from the real bnb
  `dequantize_4bit` applied to the `ref` state.

Deterministic: fixed seeds, one CPU thread (torch's CPU sum order depends on the split).
"""

from __future__ import annotations

import argparse
import datetime
from decimal import Decimal
import json
import platform
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

REPO = Path(__file__).resolve().parents[2]
f32 = np.float32

# dQuantizeNF4's literals, as written in csrc/kernels.cu.
THR_SRC = ["-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
           "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
           "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
           "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"]


def nearest_f32(text: str) -> np.float32:
    """A C++ `...f` literal: the decimal rounded ONCE to float32 (not via double)."""
    d = Decimal(text)
    f = np.float32(float(text))
    cands = [np.nextafter(f, f32(-2)), f, np.nextafter(f, f32(2))]
    return min(cands, key=lambda c: abs(Decimal(float(c)) - d))


# What nvcc compiles them to (and what the shipped libbitsandbytes_cuda11x/12x.so SASS holds:
# 0xbf591cd9, 0x3df64863, 0x3f006d03, 0x3f5c89d9, never the +-1 ulp neighbours).
THR = np.array([nearest_f32(t) for t in THR_SRC], dtype=f32)
# decimal → double → float32 (formats.md §1.2's column); equals bnb CPU's bucketize bounds
# (code[:-1] + code[1:]) / 2. Differs from THR by 1 ulp at i = 0, 8, 12, 14.
THR_VIA_DOUBLE = np.array([float(t) for t in THR_SRC], dtype=f32)
assert [hex(v) for v in THR.view(np.uint32)[[0, 8, 12, 14]]] == [
    "0xbf591cd9", "0x3df64863", "0x3f006d03", "0x3f5c89d9"]


def ref_quantize_4bit(x: torch.Tensor):
    """kQuantizeBlockwise<NF4>: absmax over 64, inv = 1/absmax, code = #thresholds < x*inv."""
    a = x.reshape(-1).float().numpy()
    n = a.size
    nb = -(-n // 64)
    blocks = np.zeros(nb * 64, f32)
    blocks[:n] = a  # the kernel loads padding as 0 and quantizes it like any value
    blocks = blocks.reshape(nb, 64)
    absmax = np.abs(blocks).max(axis=1).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = f32(1.0) / absmax  # 1/0 = inf; 0*inf = NaN → every `>` fails → code 0
        scaled = blocks * inv[:, None]
    codes = (scaled[..., None] > THR).sum(-1).astype(np.uint8).reshape(-1)
    codes = codes[: n + (n & 1)]
    packed = (codes[0::2] << 4) | codes[1::2]
    return torch.from_numpy(packed.reshape(-1, 1).copy()), torch.from_numpy(absmax)


def ref_dquantize0(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dQuantize<0> from csrc/kernels.cu, vectorised: 7-step binary search + float32 midpoints."""
    pivot = np.full(x.shape, 127)
    upper_p, lower_p = np.full(x.shape, 255), np.zeros(x.shape, int)
    upper, lower = np.full(x.shape, f32(1.0)), np.full(x.shape, f32(-1.0))
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lower_p, lower = np.where(gt, pivot, lower_p), np.where(gt, val, lower)
        upper_p, upper = np.where(gt, upper_p, pivot), np.where(gt, upper, val)
        pivot = np.where(gt, pivot + i, pivot - i)
        val = code[pivot]
    upper = np.where(upper_p == 255, code[255], upper).astype(f32)
    lower = np.where(lower_p == 0, code[0], lower).astype(f32)
    mid_up = (upper + val) * f32(0.5)
    mid_lo = (lower + val) * f32(0.5)
    gt = x > val
    out = np.where(gt, np.where(x > mid_up, upper_p, pivot), np.where(x < mid_lo, lower_p, pivot))
    return out.astype(np.uint8)


def ref_quantize_blockwise(a: torch.Tensor, code: torch.Tensor, bs: int = 256):
    """kQuantizeBlockwise<General8bit> with the dynamic map (the nested absmax step)."""
    v = a.numpy().astype(f32)
    n = v.size
    nb = -(-n // bs)
    pad = np.zeros(nb * bs, f32)
    pad[:n] = v
    blocks = pad.reshape(nb, bs)
    absmax = np.abs(blocks).max(axis=1).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = blocks * (f32(1.0) / absmax)[:, None]
    q = ref_dquantize0(code.numpy(), scaled).reshape(-1)[:n]
    return torch.from_numpy(q.copy()), torch.from_numpy(absmax)


def make_cases():
    g = torch.Generator().manual_seed(20260404)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = {}
    cases["randn_bf16"] = randn(64, 192).to(torch.bfloat16)
    cases["randn_f32"] = randn(64, 192)
    cases["randn_f16"] = (randn(16, 64) * 0.02).to(torch.float16)
    z = randn(6, 128)
    zf = z.reshape(-1, 64)
    for b in (0, 3, 4, 11):  # all-zero blocks, the last one included
        zf[b] = 0
    zf[5] = 0
    zf[5, 17] = -3e-30  # a block whose only nonzero is tiny (inv = 3.3e29, still finite)
    cases["zero_blocks"] = z.to(torch.bfloat16)
    # x*inv exactly on a threshold: absmax a power of two makes t*A*(1/A) == t exactly.
    rows = []
    perm = torch.randperm(64, generator=g)
    for A in (1.0, 2.0, 0.5, 2.0**-10, 2.0**20):
        t = torch.from_numpy(THR)
        up = torch.nextafter(t, torch.tensor(2.0))
        dn = torch.nextafter(t, torch.tensor(-2.0))
        code = F.get_4bit_type("nf4", device="cpu")
        vals = torch.cat([torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5, -0.25]), t, up, dn, code[1:7], code[8:15]])
        assert vals.numel() == 64
        rows.append((vals * A)[perm])
    cases["midpoints"] = torch.stack(rows)
    o = randn(8, 192)
    o[3, 70] = 1e4  # one outlier block dominates the nested absmax
    cases["outliers"] = o.to(torch.bfloat16)
    cases["odd_1d"] = randn(64 * 3 + 17)  # partial last block, odd n → one padded nibble
    t = randn(64 + 9)
    t[64:] = 0  # all-zero partial last block
    cases["odd_zero_tail"] = t
    cases["big_bf16"] = randn(136, 256).to(torch.bfloat16)  # 544 blocks → 3 nested blocks
    # Block absmaxes 2 + δ (|δ| ≲ 1e-5) around a mean of ~2, spread 1..3: the nested inputs
    # land within 1e-5 of 0, where the dynamic map is finer than bnb CPU's 65536-entry LUT.
    e = (torch.rand(64, 64, generator=g) - 0.5)
    amax = 2.0 + torch.linspace(-2e-5, 2e-5, 64) * torch.rand(64, generator=g)
    amax[0], amax[1] = 1.0, 3.0
    e[:, 0] = 1.0
    cases["nested_edge"] = e * amax[:, None]
    return cases


def tsave(d: dict, path: Path):
    safetensors.torch.save_file({k: v.contiguous() for k, v in d.items()}, str(path), metadata={"format": "pt"})


def gen_case(name: str, x: torch.Tensor, out: Path, report: dict):
    dyn = F.create_dynamic_map()
    d = {"input": x}
    # --- bitsandbytes, CPU backend --------------------------------------------------------
    q, st = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    q2, st2 = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q, q2) and torch.equal(st2.state2.code, dyn)
    d["bnb.packed"], d["bnb.absmax"] = q, st.absmax
    d["bnb.dequant"] = F.dequantize_4bit(q, st)
    d["bnb.dq.absmax"], d["bnb.dq.nested_absmax"] = st2.absmax, st2.state2.absmax
    d["bnb.dq.offset"] = st2.offset.reshape(1)
    d["bnb.dq.dequant"] = F.dequantize_4bit(q2, st2)
    assert st2.offset.item() == st.absmax.mean().item()
    # --- CUDA-kernel semantics, dequantized by the real bnb ------------------------------
    rq, rabs = ref_quantize_4bit(x)
    roff = rabs.mean()  # torch CPU mean, as bnb computes it (CUDA's own mean may differ)
    rqa, rnested = ref_quantize_blockwise(rabs - roff, dyn)
    rst = F.QuantState(absmax=rabs, shape=x.shape, code=st.code, blocksize=64, quant_type="nf4", dtype=x.dtype)
    nested = F.QuantState(absmax=rnested, code=dyn, blocksize=256, dtype=torch.float32)
    rst2 = F.QuantState(absmax=rqa, shape=x.shape, code=st.code, blocksize=64, quant_type="nf4",
                        dtype=x.dtype, offset=roff, state2=nested)
    ref = {"ref.packed": rq, "ref.absmax": rabs, "ref.dequant": F.dequantize_4bit(rq, rst),
           "ref.dq.absmax": rqa, "ref.dq.nested_absmax": rnested, "ref.dq.offset": roff.reshape(1),
           "ref.dq.dequant": F.dequantize_4bit(rq, rst2)}
    diff = {}
    for k, v in ref.items():
        b = d["bnb." + k[4:]]
        if v.dtype != b.dtype or v.shape != b.shape or not torch.equal(v.view(torch.uint8), b.view(torch.uint8)):
            d[k] = v
            diff[k[4:]] = int((v.view(torch.uint8) != b.view(torch.uint8)).sum())
    # The nested codes that differ: the CUDA choice is always the nearest map entry.
    sc = (rabs - roff).numpy()
    cv = dyn.numpy()
    bq = st2.absmax.numpy()
    nz = rnested.numpy().repeat(256)[: sc.size]
    xs = sc / nz
    assert np.all(np.abs(cv[rqa.numpy()] - xs) <= np.abs(cv[bq] - xs) + 0), name
    report[name] = {"shape": list(x.shape), "dtype": str(x.dtype)[6:], "ref_differs_from_bnb_cpu_bytes": diff,
                    "nested_code_max_step": int(np.abs(rqa.numpy().astype(int) - bq.astype(int)).max())}
    tsave(d, out / f"{name}.safetensors")
    return d


def mean_vectors():
    """Deterministic inputs x_i = ((i*2654435761 mod 2^32) >> 8) * 2^-24 * 3 and their
    torch CPU mean, to pin torch's cascade-sum order in C++ (sizes past 32768 need 1 thread)."""
    sizes = [1, 3, 5, 7, 8, 9, 15, 31, 33, 64, 100, 192, 255, 511, 512, 513, 544, 4096, 5000,
             65573, 262144, 1000003]
    means = []
    for n in sizes:
        h = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
        v = (h >> np.uint64(8)).astype(f32) * f32(2.0**-24) * f32(3.0)
        means.append(torch.from_numpy(v).mean())
    return torch.tensor(sizes, dtype=torch.int64), torch.stack(means)


def linear4bit_state(x: torch.Tensor, out: Path):
    """A real Linear4bit state_dict (as Transformers/PEFT would save it), quantized on CPU."""
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Module()
    lin = bnb.nn.Linear4bit(x.shape[1], x.shape[0], bias=True, compute_dtype=torch.bfloat16,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(x.clone(), requires_grad=False, compress_statistics=True,
                                   quant_type="nf4", blocksize=64)
    lin.bias = torch.nn.Parameter(torch.randn(x.shape[0], generator=g).to(torch.bfloat16), requires_grad=False)
    model.proj = lin
    model.to("cpu")  # Params4bit.to() quantizes
    assert lin.weight.bnb_quantized
    sd = model.state_dict()
    tsave(dict(sd), out / "linear4bit_state.safetensors")
    return {k: [str(v.dtype)[6:], list(v.shape)] for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "tests/golden/nf4"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    code = F.get_4bit_type("nf4", device="cpu")
    bounds = (code[:-1] + code[1:]) / 2  # bnb CPU's bucketize bounds
    assert np.array_equal(bounds.numpy(), THR_VIA_DOUBLE), "bnb CPU bounds are the float32 midpoints"
    assert int((bounds.numpy() != THR).sum()) == 4
    sizes, means = mean_vectors()
    tsave({"quant_map": code, "nested_quant_map": F.create_dynamic_map(), "thresholds": torch.from_numpy(THR),
           "cpu_bounds": bounds,
           "mean.sizes": sizes, "mean.values": means}, out / "common.safetensors")

    report = {}
    cases = make_cases()
    for name, x in cases.items():
        gen_case(name, x, out, report)
    keys = linear4bit_state(cases["randn_bf16"], out)

    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
        "safetensors": safetensors.__version__, "numpy": np.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": datetime.date.today().isoformat(), "generator": "scripts/golden/make_nf4_golden.py",
    }
    (out / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    (out / "cases.json").write_text(json.dumps({"cases": report, "linear4bit_state": keys}, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"{total} bytes in {out}", file=sys.stderr)
    assert total < 1_000_000


if __name__ == "__main__":
    main()
