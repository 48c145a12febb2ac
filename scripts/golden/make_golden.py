#!/usr/bin/env python3
"""Regenerate every golden fixture under tests/golden/ from the REAL Hugging Face
transformers Gemma 4 implementation.

    python scripts/golden/make_golden.py            # writes tests/golden/ (repo-relative)
    python scripts/golden/make_golden.py --out DIR  # somewhere else

Deterministic (fixed seeds, single CPU thread, fp32, eager attention/experts); re-running
gives byte-identical files except VERSIONS.json (date) and MANIFEST.sha256 (which lists it).
See scripts/golden/README.md for what each file holds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_gemma4 as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(os.environ.get("GEMMA4_CONFIG_DIR", "/work/shared/models"))
RELEASED = ["gemma-4-E2B-it", "gemma-4-E4B-it", "gemma-4-31B-it", "gemma-4-26B-A4B-it"]

S, F = "sliding_attention", "full_attention"
BATCH, SEQ = 2, 24
SEED = 20260401

COMMON = dict(
    vocab_size=512,
    vocab_size_per_layer_input=512,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    intermediate_size=128,
    sliding_window=8,
    final_logit_softcapping=30.0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    hidden_activation="gelu_pytorch_tanh",
)

VARIANTS = {
    # 31B-like: K=V on full layers, separate global KV head count, no PLE
    "dense_kv": dict(
        num_hidden_layers=6, layer_types=[S, S, F, S, S, F], attention_k_eq_v=True,
        num_key_value_heads=2, num_global_key_value_heads=1, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, use_double_wide_mlp=False, enable_moe_block=False,
    ),
    # E2B-like: PLE, KV sharing of the last 4 layers, double-wide MLP on shared layers
    "e2b": dict(
        num_hidden_layers=10, layer_types=[S, S, S, S, F] * 2, attention_k_eq_v=False,
        num_key_value_heads=1, hidden_size_per_layer_input=16, num_kv_shared_layers=4,
        use_double_wide_mlp=True, enable_moe_block=False,
    ),
    # E4B-like: PLE, KV sharing of the last 4 layers, normal MLP
    "e4b": dict(
        num_hidden_layers=12, layer_types=[S, S, S, S, S, F] * 2, attention_k_eq_v=False,
        num_key_value_heads=2, hidden_size_per_layer_input=16, num_kv_shared_layers=4,
        use_double_wide_mlp=False, enable_moe_block=False,
    ),
    # 26B-A4B-like: K=V, MoE block parallel to a dense MLP, no PLE
    "moe": dict(
        num_hidden_layers=6, layer_types=[S, S, F, S, S, F], attention_k_eq_v=True,
        num_key_value_heads=2, num_global_key_value_heads=1, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, use_double_wide_mlp=False, enable_moe_block=True,
        num_experts=8, top_k_experts=2, moe_intermediate_size=32, intermediate_size=48,
    ),
}

# std of the random init (everything is drawn from a per-variant torch.Generator, in
# sorted-name order, so the draw does not depend on module registration order)
STD_LINEAR = 0.05
STD_EMBED = 0.25  # tied lm_head too: logits std ~ 8*0.25 = 2, |max| ~ 10 (soft-cap 30 active, not saturated)
STD_ROUTER_PROJ = 2.0  # router logits ~ N(0, 2^2): clear top-k separation
NORM_JITTER = 0.2
QK_NORM_GAIN = 0.5
# Largest max|fp32 − fp64| / max|fp64| of HF's own logits accepted for a fixture.
MAX_FP32_NOISE = 3e-6


def log(*a):
    print("[make_golden]", *a, flush=True)


def variant_config(name: str) -> Gemma4TextConfig:
    kw = dict(COMMON)
    kw.update(VARIANTS[name])
    kw["layer_types"] = list(kw["layer_types"])
    return Gemma4TextConfig(**kw, attn_implementation="eager", experts_implementation="eager")


def randomize_(model: Gemma4ForCausalLM, seed: int) -> dict:
    """Overwrite every parameter and persistent buffer with seeded random values."""
    g = torch.Generator().manual_seed(seed)
    rules = {}
    params = dict(model.named_parameters())  # tied lm_head is deduplicated away
    persistent = {k for k in model.state_dict().keys()}
    buffers = {k: b for k, b in model.named_buffers() if k in persistent}
    every = {**params, **buffers}
    with torch.no_grad():
        for name in sorted(every):
            t = every[name]
            shape = t.shape
            n = lambda: torch.randn(shape, generator=g, dtype=torch.float32)  # noqa: E731
            if name.endswith("layer_scalar"):
                v, rule = 0.5 + torch.rand(shape, generator=g), "U(0.5,1.5)"
            elif name.endswith(("embed_tokens.weight", "embed_tokens_per_layer.weight")):
                v, rule = STD_EMBED * n(), f"{STD_EMBED}*N(0,1)"
            elif name.endswith("router.proj.weight"):
                v, rule = STD_ROUTER_PROJ * n(), f"{STD_ROUTER_PROJ}*N(0,1)"
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention has scale 1.0, so q·k of unit-RMS heads gives scores ~N(0, d); a gain of
                # 0.5 keeps the softmax peaked but stops it amplifying fp32 rounding (see MAX_FP32_NOISE).
                v, rule = QK_NORM_GAIN * (1.0 + NORM_JITTER * n()), f"{QK_NORM_GAIN}*(1+{NORM_JITTER}*N(0,1))"
            elif name.endswith(("router.scale", "router.per_expert_scale")) or "norm" in name.split(".")[-2]:
                v, rule = 1.0 + NORM_JITTER * n(), f"1+{NORM_JITTER}*N(0,1)"
            elif name.endswith(("_proj.weight", "experts.gate_up_proj", "experts.down_proj",
                                "per_layer_input_gate.weight", "per_layer_projection.weight",
                                "per_layer_model_projection.weight")):
                v, rule = STD_LINEAR * n(), f"{STD_LINEAR}*N(0,1)"
            else:
                raise RuntimeError(f"no randomisation rule for {name} {tuple(shape)}")
            t.copy_(v)
            rules[name] = rule
    return rules


def build_model(name: str, seed: int):
    torch.manual_seed(seed)
    cfg = variant_config(name)
    model = Gemma4ForCausalLM(cfg).to(torch.float32)
    rules = randomize_(model, seed)
    model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight, "lm_head must be tied"
    return model, rules


def make_inputs(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)
    ids[:, 0] = 2  # <bos>
    labels = ids.clone()
    labels[0, :5] = -100
    for b in range(BATCH):
        pos = torch.randperm(SEQ - 6, generator=g)[:3] + 6
        labels[b, pos] = -100
    return ids, labels


MIN_ROUTER_GAP = 2e-4  # min over tokens/layers of p[k-th] - p[(k+1)-th]; fp32 noise is ~1e-7


def router_gap(model, ids) -> float:
    gaps = []
    hooks = [layer.router.register_forward_hook(
        lambda m, inp, out: gaps.append(
            (lambda srt: (srt[..., m.config.top_k_experts - 1] - srt[..., m.config.top_k_experts]).min().item())(
                out[0].sort(-1, descending=True).values)))
        for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return min(gaps)


@contextlib.contextmanager
def fp64_throughout():
    """Runs HF's Gemma 4 with its fp32 islands (RMSNorm, softmax dtype=float32, RoPE cos/sin) in fp64."""
    from transformers.models.gemma4 import modeling_gemma4 as mg

    orig_norm, orig_softmax = mg.Gemma4RMSNorm.forward, torch.nn.functional.softmax
    orig_rope = mg.Gemma4TextRotaryEmbedding.forward

    def rope64(self, x, position_ids, layer_type):
        if x.dtype != torch.float64:
            return orig_rope(self, x, position_ids, layer_type)
        inv_freq = getattr(self, f"{layer_type}_inv_freq").double()  # the fp32-computed table
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = getattr(self, f"{layer_type}_attention_scaling")
        return emb.cos() * scale, emb.sin() * scale

    def norm64(self, x):
        if x.dtype != torch.float64:
            return orig_norm(self, x)
        y = self._norm(x)
        return y * self.weight.double() if self.with_scale else y

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64:
            dtype = None
        return orig_softmax(input, dim=dim, dtype=dtype)

    mg.Gemma4RMSNorm.forward, torch.nn.functional.softmax = norm64, softmax64
    mg.Gemma4TextRotaryEmbedding.forward = rope64
    try:
        yield
    finally:
        mg.Gemma4RMSNorm.forward, torch.nn.functional.softmax = orig_norm, orig_softmax
        mg.Gemma4TextRotaryEmbedding.forward = orig_rope


def grad_probes(g: torch.Tensor) -> list:
    """Three numbers that pin a gradient tensor down: Σg, Σg², Σ g_i·cos(0.37·i) over the
    flat index i (tests/test_golden_grad.cpp computes the same)."""
    flat = g.detach().double().reshape(-1)
    c = torch.cos(0.37 * torch.arange(flat.numel(), dtype=torch.float64))
    return [flat.sum().item(), (flat * flat).sum().item(), (flat * c).sum().item()]


def save_grad_probes(model64, ids, labels, outdir: Path):
    """Gradients of the token-mean loss by transformers' autograd in fp64 (fp32 islands lifted)."""
    model64.zero_grad(set_to_none=True)
    with torch.enable_grad(), fp64_throughout():
        logits = model64(input_ids=ids, use_cache=False).logits
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
    probes = {name.removeprefix("model."): grad_probes(p.grad)
              for name, p in model64.named_parameters() if p.grad is not None}
    record = {"loss": loss.item(), "probes": "[sum, sum of squares, sum of g_i*cos(0.37*i)]",
              "grads": probes}
    (outdir / "grad_probes.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def save_forward(model, name: str, outdir: Path, seed: int, checks: dict, input_seed: int):
    cfg = model.config
    ids, labels = make_inputs(cfg.vocab_size, input_seed)
    hooks, router_calls, final_in = [], [], []
    if cfg.enable_moe_block:
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.router.register_forward_hook(
                lambda m, inp, out, i=i: router_calls.append((i, inp[0].detach().clone(), out))))
    hooks.append(model.model.norm.register_forward_hook(lambda m, inp, out: final_in.append(inp[0].detach().clone())))

    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, use_cache=False)
        n_router_first = len(router_calls)
        out_cache = model(input_ids=ids, labels=labels, use_cache=True)
        out_hs = model(input_ids=ids, labels=labels, use_cache=False, output_hidden_states=True)
    for h in hooks:
        h.remove()

    logits = out.logits.detach().float().contiguous()
    d_cache = (logits - out_cache.logits).abs().max().item()
    d_hs = (logits - out_hs.logits).abs().max().item()
    assert d_cache <= 1e-6, f"{name}: use_cache=True logits differ by {d_cache}"
    assert d_hs == 0.0, f"{name}: output_hidden_states changed logits by {d_hs}"
    assert abs(out.loss.item() - out_cache.loss.item()) <= 1e-6

    hs = torch.stack([h.detach().float() for h in out_hs.hidden_states]).contiguous()
    L = cfg.num_hidden_layers
    assert hs.shape == (L + 1, BATCH, SEQ, cfg.hidden_size), hs.shape
    prenorm = final_in[0]
    # HF ties hidden_states[-1] to the post-final-norm last_hidden_state
    assert torch.equal(hs[-1], model.model.norm(prenorm))

    tensors = {
        "input_ids": ids.contiguous(),
        "labels": labels.contiguous(),
        "logits": logits,
        "loss": out.loss.detach().float().reshape(1).contiguous(),
        "hidden_states": hs,
        "last_layer_output": prenorm.float().contiguous(),
    }
    info = {"logits_abs_max": logits.abs().max().item(), "logits_std": logits.std().item(),
            "loss": out.loss.item(), "use_cache_max_abs_diff": d_cache}

    if cfg.hidden_size_per_layer_input:
        with torch.no_grad():
            emb = model.model.embed_tokens(ids)
            ple = model.model.project_per_layer_inputs(emb, model.model.get_per_layer_inputs(ids, emb))
        tensors["per_layer_inputs"] = ple.float().contiguous()

    if cfg.enable_moe_block:
        calls = router_calls[:n_router_first]
        assert [c[0] for c in calls] == list(range(L))
        idx = torch.stack([c[2][2] for c in calls]).to(torch.int64).contiguous()
        w = torch.stack([c[2][1] for c in calls]).float().contiguous()
        probs = torch.stack([c[2][0] for c in calls]).float()
        srt = probs.sort(-1, descending=True).values
        k = cfg.top_k_experts
        gap = (srt[..., k - 1] - srt[..., k]).min().item()
        counts = torch.bincount(idx.flatten(), minlength=cfg.num_experts).tolist()
        tensors["router_top_k_index"] = idx
        tensors["router_top_k_weights"] = w
        info.update(router_min_topk_prob_gap=gap, expert_use_counts=counts)
        assert gap >= MIN_ROUTER_GAP, f"{name}: top-k routing nearly tied (gap {gap})"
        assert min(counts) > 0, f"{name}: some expert never used {counts}"

    # transformers itself in float64: the exact answer our F64 mode must reproduce, and a
    # measure of how much fp32 rounding this random model amplifies (the fixture must be
    # well enough conditioned that the 1e-5 fp32 bound tests the math, not the noise).
    # HF computes RMSNorm, the softmaxes, RoPE's cos/sin and the loss in fp32 even in an fp64
    # model; those upcasts are lifted for this run so that it is fp64 throughout.
    model64 = copy.deepcopy(model).double()
    with torch.no_grad(), fp64_throughout():
        out64 = model64(input_ids=ids, use_cache=False)
    logits64 = out64.logits.detach().double().contiguous()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    loss64 = torch.nn.functional.cross_entropy(logits64.reshape(-1, logits64.shape[-1]),
                                               shifted.reshape(-1), ignore_index=-100)
    tensors["logits_fp64"] = logits64
    tensors["loss_fp64"] = loss64.reshape(1).contiguous()
    save_grad_probes(model64, ids, labels, outdir)
    fp32_noise = ((logits.double() - logits64).abs().max() / logits64.abs().max()).item()
    info.update(hf_fp32_vs_fp64_logits_rel=fp32_noise, loss_fp64=loss64.item())
    assert fp32_noise <= MAX_FP32_NOISE, f"{name}: fp32 rounding noise {fp32_noise:.3g} too large"

    # independent from-the-spec reference in float64
    sd = safetensors.torch.load_file(str(outdir / "model.safetensors"))
    with open(outdir / "config.json") as f:
        cfg_json = json.load(f)
    ref_logits, ref_hidden, _ = ref.forward(cfg_json, sd, ids, dtype=torch.float64, return_hidden=True)
    ref_loss = ref.causal_lm_loss(ref_logits, labels)
    d_ref = (ref_logits - logits.double()).abs().max().item()
    d_ref_h = max((a.double() - b).abs().max().item() for a, b in zip(hs[:-1], ref_hidden[:-1]))
    d_ref_loss = abs(ref_loss.item() - out.loss.item())
    info.update(reference_fp64_logits_max_abs_diff=d_ref, reference_fp64_hidden_max_abs_diff=d_ref_h,
                reference_fp64_loss_abs_diff=d_ref_loss)
    # the release-style config must give the same reference output
    with open(outdir / "config.release_style.json") as f:
        rel = json.load(f)
    d_rel = (ref.forward(rel, sd, ids, dtype=torch.float64) - ref_logits).abs().max().item()
    assert d_rel == 0.0
    assert d_ref < 1e-3 and d_ref_loss < 1e-4, (name, d_ref, d_ref_loss)
    # sensitivity: each plausible-but-wrong reading of the spec must move the logits a lot
    ablations = [("window_offset", -1), ("window_offset", 1), ("layer_scalar_residual_only", True)]
    if any(t == F for t in cfg.layer_types):
        ablations.append(("rope_denominator_rotated", True))
    if cfg.attention_k_eq_v:
        ablations.append(("k_eq_v_normed_k", True))
    if cfg.num_kv_shared_layers:
        ablations.append(("kv_share_first_layer", True))
    if cfg.enable_moe_block:
        ablations.append(("router_no_per_expert_scale", True))
    if cfg.hidden_size_per_layer_input:
        ablations.append(("ple_no_ctx", True))
    sens = {}
    for k, v in ablations:
        dd = (ref.forward(cfg_json, sd, ids, ablate={k: v}) - ref_logits).abs().max().item()
        sens[f"{k}={v}"] = dd
        assert dd > 1e-2, f"{name}: golden data insensitive to {k}={v} ({dd})"
    if cfg.enable_moe_block:
        # NOT asserted: the top-k renormalisation is a per-token scalar on the expert sum,
        # which post_feedforward_layernorm_2 (RMSNorm) cancels up to eps -> nearly invisible
        sens["router_no_renorm=True (weak, not asserted)"] = (
            ref.forward(cfg_json, sd, ids, ablate={"router_no_renorm": True}) - ref_logits).abs().max().item()
    info["ablation_logits_max_abs_diff"] = sens

    safetensors.torch.save_file(tensors, str(outdir / "forward.safetensors"), metadata={"format": "pt"})
    checks[name] = info
    log(f"{name}: loss={out.loss.item():.6f} |logits|max={info['logits_abs_max']:.3f} "
        f"cache_diff={d_cache:.2e} ref_fp64_diff={d_ref:.2e}")


def release_style_config(cfg_json: dict, variant: dict) -> dict:
    """config.json rewritten with the release-era keys (global_head_dim,
    num_global_key_value_heads) instead of transformers' per_layer_config."""
    out = {k: v for k, v in cfg_json.items() if k != "per_layer_config"}
    out["global_head_dim"] = COMMON["global_head_dim"]
    out["num_global_key_value_heads"] = variant.get("num_global_key_value_heads")
    return dict(sorted(out.items()))


def check_saved_names(model, outdir: Path, report: dict, name: str):
    from safetensors import safe_open

    with safe_open(str(outdir / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    prefixes = sorted({k.split(".")[0] for k in keys})
    cfg = model.config
    modes = cfg.kv_sharing_modes
    per_layer = {}
    for i in range(cfg.num_hidden_layers):
        attn = sorted(k.split(f"model.layers.{i}.self_attn.")[1] for k in keys
                      if k.startswith(f"model.layers.{i}.self_attn."))
        per_layer[i] = {"type": cfg.layer_types[i], "kv_sharing": modes[i], "self_attn_tensors": attn}
    report[name] = {
        "num_tensors": len(keys),
        "top_level_prefixes": prefixes,
        "lm_head_saved": any(k.startswith("lm_head") for k in keys),
        "dtypes": sorted(dtypes),
        "metadata": meta,
        "layers": per_layer,
        "non_layer_tensors": [k for k in keys if ".layers." not in k],
    }
    # reload through HF and verify bit-identical state
    re = Gemma4ForCausalLM.from_pretrained(str(outdir), attn_implementation="eager",
                                           experts_implementation="eager", dtype=torch.float32)
    a, b = model.state_dict(), re.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"reload mismatch {k}"


# --------------------------------------------------------------------------- C: params
def categorize(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "embed_tokens"
    if name.startswith("lm_head"):
        return "lm_head_untied"
    if name.startswith(("model.embed_tokens_per_layer", "model.per_layer_model_projection",
                        "model.per_layer_projection_norm")):
        return "ple_global"
    if ".layers." in name:
        rest = name.split(".", 3)[3]  # after model.layers.<i>.
        if rest.startswith("self_attn."):
            return "attention"
        if rest.startswith("mlp."):
            return "mlp"
        if rest.startswith("experts."):
            return "experts"
        if rest.startswith("router."):
            return "router"
        if rest.startswith(("per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm")):
            return "ple_per_layer"
        if "layernorm" in rest:
            return "norms"
    if name == "model.norm.weight":
        return "norms"
    raise RuntimeError(f"uncategorised parameter {name}")


def count_params(cfg: Gemma4TextConfig) -> dict:
    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg)
    comps: dict[str, int] = {}
    seen = set()
    total = 0
    for n, p in model.named_parameters():  # tied weights are yielded once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        c = categorize(n)
        comps[c] = comps.get(c, 0) + p.numel()
    assert sum(comps.values()) == total
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    ls = [n for n, _ in model.named_buffers() if n.endswith("layer_scalar")]
    attn_detail = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 0, "q_norm": 0, "k_norm": 0}
    for n, p in model.named_parameters():
        for k in attn_detail:
            if f".self_attn.{k}." in n:
                attn_detail[k] += p.numel()
    return {
        "total": total,
        "components": dict(sorted(comps.items())),
        "attention_detail": attn_detail,
        "layer_scalar_buffers": len(ls),
        "total_including_layer_scalar_buffers": total + len(ls),
        "lm_head_tied": tied,
        "num_hidden_layers": cfg.num_hidden_layers,
    }


def param_counts(out: Path):
    res = {}
    for name in RELEASED:
        with open(MODELS_DIR / name / "config.json") as f:
            tc = json.load(f)["text_config"]
        cfg = Gemma4TextConfig(**tc)
        res[name] = count_params(cfg)
        log(f"params {name}: {res[name]['total']:,}")
    for name in VARIANTS:
        res[name] = count_params(variant_config(name))
    (out / "param_counts.json").write_text(json.dumps(res, indent=2, sort_keys=False) + "\n")
    return res


# --------------------------------------------------------------------------- D: safetensors
def mixed_tensors() -> dict[str, torch.Tensor]:
    def idx(shape):
        n = int(np.prod(shape)) if len(shape) else 1
        return np.arange(n, dtype=np.int64), n

    t = {}
    i, _ = idx([2, 3])
    t["f64"] = torch.from_numpy(i.astype(np.float64) * 0.1 - 0.25).reshape(2, 3)
    i, _ = idx([3, 5])
    t["f32"] = torch.from_numpy((i.astype(np.float32) * np.float32(0.25) - np.float32(1.0))).reshape(3, 5)
    i, _ = idx([2, 2, 3])
    t["f16"] = torch.from_numpy((i.astype(np.float32) * 0.5 - 3.0)).to(torch.float16).reshape(2, 2, 3)
    i, _ = idx([4, 2])
    t["bf16"] = torch.from_numpy((i.astype(np.float32) * 0.5 - 2.0)).to(torch.bfloat16).reshape(4, 2)
    i, _ = idx([6])
    # fp32 value 1 + i/3 (computed in fp32), rounded to nearest-even bf16 by torch
    t["bf16_rounded"] = (torch.tensor(1.0, dtype=torch.float32)
                         + torch.from_numpy(i.astype(np.float32)) / torch.tensor(3.0)).to(torch.bfloat16)
    i, _ = idx([5])
    t["i64"] = torch.from_numpy((i - 2) * (1 << 40) + i)
    i, _ = idx([2, 3])
    t["i32"] = torch.from_numpy((i * 100000 - 250000).astype(np.int32)).reshape(2, 3)
    i, _ = idx([8])
    t["i8"] = torch.from_numpy((i * 31 - 120).astype(np.int8))
    i, _ = idx([3, 4])
    t["u8"] = torch.from_numpy((i * 21).astype(np.uint8)).reshape(3, 4)
    i, _ = idx([7])
    t["bool"] = torch.from_numpy(i % 3 == 0)
    t["scalar_f32"] = torch.tensor(3.5, dtype=torch.float32)
    t["empty_f32"] = torch.zeros((0, 3), dtype=torch.float32)
    return {k: v.contiguous() for k, v in t.items()}


SAFETENSORS_README = """\
# safetensors byte fixtures

Generated by `scripts/golden/make_golden.py` (`mixed_tensors()`); do not edit by hand.

## mixed.safetensors

Written with `safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})`
(safetensors @ST_VERSION@). `i` is the flat row-major index (0-based) of the element.

| name | dtype | shape | value of element i |
|---|---|---|---|
| `f64` | F64 | [2,3] | `double(i) * 0.1 - 0.25` (double arithmetic) |
| `f32` | F32 | [3,5] | `float(i) * 0.25f - 1.0f` (exact) |
| `f16` | F16 | [2,2,3] | `i * 0.5 - 3` (exact in fp16) |
| `bf16` | BF16 | [4,2] | `i * 0.5 - 2` (exact in bf16) |
| `bf16_rounded` | BF16 | [6] | `1.0f + float(i) / 3.0f` computed in fp32, then rounded to bf16 round-to-nearest-even: 1.0, 1.3359375, 1.6640625, 2.0, 2.328125, 2.671875 |
| `i64` | I64 | [5] | `(i - 2) * 2^40 + i` (negative values and high bits) |
| `i32` | I32 | [2,3] | `i * 100000 - 250000` |
| `i8` | I8 | [8] | `i * 31 - 120` (-120 .. 97) |
| `u8` | U8 | [3,4] | `i * 21` (0 .. 231) |
| `bool` | BOOL | [7] | `i % 3 == 0` (one byte per element, 0/1) |
| `scalar_f32` | F32 | [] | `3.5` (rank-0 tensor, 4 bytes) |
| `empty_f32` | F32 | [0,3] | no elements; `data_offsets` [a,a] |

File layout (as written): 8-byte little-endian header length N = @HDR_LEN@, then N bytes
of JSON header (space-padded to a multiple of 8), then the data section (@DATA_LEN@ bytes).
Total file size @FILE_LEN@ bytes. safetensors orders the data section by dtype alignment
(largest first) then by name, so the header key order is not alphabetical:

```
@HEADER@
```

## ../e4b_sharded/

`tests/golden/e4b/` cast to **bf16** and saved with
`save_pretrained(dir, safe_serialization=True, max_shard_size="200KB")`:
`model-KKKKK-of-@N_SHARDS@.safetensors` (K = 00001..) + `model.safetensors.index.json` (written by transformers
as `json.dumps(index, indent=2, sort_keys=True) + "\\n"`, keys `metadata.total_parameters`,
`metadata.total_size` (bytes of tensor data), `weight_map`). Every tensor equals
`bf16_rne(tests/golden/e4b/model.safetensors[name])` bit for bit.
"""


def safetensors_fixtures(out: Path, e4b_model):
    d = out / "safetensors"
    d.mkdir(parents=True, exist_ok=True)
    tensors = mixed_tensors()
    safetensors.torch.save_file(tensors, str(d / "mixed.safetensors"), metadata={"format": "pt"})
    raw = (d / "mixed.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    # round-trip check
    back = safetensors.torch.load_file(str(d / "mixed.safetensors"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    log(f"mixed.safetensors: header {n} bytes, {len(raw)} bytes total")

    # sharded copy of the e4b model, cast to bf16 (the released checkpoints' dtype; also
    # keeps it ~1.2 MB): every tensor == bf16_round_to_nearest_even(e4b/model.safetensors)
    sh = out / "e4b_sharded"
    if sh.exists():
        shutil.rmtree(sh)
    bf = copy.deepcopy(e4b_model).to(torch.bfloat16)
    bf.save_pretrained(str(sh), safe_serialization=True, max_shard_size="200KB")
    files = sorted(p.name for p in sh.iterdir())
    log(f"e4b_sharded: {files}")
    re = Gemma4ForCausalLM.from_pretrained(str(sh), attn_implementation="eager",
                                           experts_implementation="eager", dtype=torch.bfloat16)
    a, b = e4b_model.state_dict(), re.state_dict()
    for k in a:
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]), k
    n_shards = sum(1 for f in files if f.startswith("model-"))
    text = SAFETENSORS_README
    for key, val in {"@ST_VERSION@": safetensors.__version__, "@HDR_LEN@": str(n),
                     "@DATA_LEN@": str(len(raw) - 8 - n), "@FILE_LEN@": str(len(raw)),
                     "@HEADER@": raw[8:8 + n].decode().rstrip(" "), "@N_SHARDS@": f"{n_shards:05d}"}.items():
        text = text.replace(key, val)
    (d / "README.md").write_text(text)
    return header


# --------------------------------------------------------------------------- main
def write_manifest(out: Path):
    lines = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "MANIFEST.sha256":
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            lines.append(f"{h}  {p.relative_to(out).as_posix()}")
    (out / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "tests" / "golden"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    checks, names_report, rules_report = {}, {}, {}
    models = {}
    for vi, name in enumerate(VARIANTS):
        seed = SEED + 1000 * vi
        input_seed = seed + 1
        model, rules = build_model(name, seed)
        if model.config.enable_moe_block:
            # deterministic search for weights whose top-k routing has a clear margin, so that
            # fp32 rounding differences in C++ cannot flip an expert choice
            ids, _ = make_inputs(model.config.vocab_size, input_seed)
            while router_gap(model, ids) < MIN_ROUTER_GAP:
                seed += 1
                model, rules = build_model(name, seed)
            log(f"{name}: model seed {seed}")
        vdir = out / name
        if vdir.exists():
            shutil.rmtree(vdir)
        model.save_pretrained(str(vdir), safe_serialization=True)
        with open(vdir / "config.json") as f:
            cfg_json = json.load(f)
        with open(vdir / "config.release_style.json", "w") as f:
            f.write(json.dumps(release_style_config(cfg_json, VARIANTS[name]), indent=2) + "\n")
        # HF must parse the release-style file into the same per-layer geometry
        rc = Gemma4TextConfig(**json.load(open(vdir / "config.release_style.json")))
        for i in range(model.config.num_hidden_layers):
            assert rc.per_layer_config[i].head_dim == model.config.per_layer_config[i].head_dim
            assert rc.per_layer_config[i].num_key_value_heads == model.config.per_layer_config[i].num_key_value_heads
        check_saved_names(model, vdir, names_report, name)
        rules_report[name] = sorted(set(rules.values()))
        save_forward(model, name, vdir, seed, checks, input_seed)
        checks[name]["model_seed"] = seed
        checks[name]["input_seed"] = input_seed
        models[name] = model

    counts = param_counts(out)
    safetensors_fixtures(out, models["e4b"])

    checks_out = {
        "forward": checks,
        "saved_tensor_names": names_report,
        "randomisation_rules": rules_report,
    }
    (out / "checks.json").write_text(json.dumps(checks_out, indent=2) + "\n")

    (out / "README.md").write_text(
        "# Golden fixtures (generated)\n\n"
        "Everything in this directory is written by `scripts/golden/make_golden.py` from the real\n"
        "Hugging Face transformers Gemma 4 code (see `VERSIONS.json`). Do not edit by hand; see\n"
        "`scripts/golden/README.md` for the contents, layouts and how to regenerate.\n")
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
        "generator": "scripts/golden/make_golden.py",
    }
    (out / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    write_manifest(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"done: {total / 1e6:.2f} MB under {out}")
    for name in RELEASED:
        log(f"  {name}: total={counts[name]['total']:,}")


if __name__ == "__main__":
    main()
