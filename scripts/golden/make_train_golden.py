#!/usr/bin/env python3
"""Golden fixtures for training: PyTorch AdamW / transformers schedules / clipping, and PEFT
LoRA (gradients and a few optimizer steps) on the tiny Gemma 4 models, all in float64.

    python scripts/golden/make_train_golden.py            # writes tests/golden/optim/ and
                                                          # tests/golden/<variant>/lora/
    python scripts/golden/make_train_golden.py --out DIR  # same layout under DIR (reads the
                                                          # tiny models from tests/golden/)

Needs torch, transformers, safetensors and peft (see VERSIONS.json). Deterministic: running
it twice gives byte-identical files (no dates are written).

tests/golden/optim/
  adamw.safetensors  torch.optim.AdamW (two param groups, wd 0.1 / 0.0) + cosine warmup
                     schedule + clip_grad_norm_, 4 steps, float64
  schedules.json     lambda(s) of the transformers schedules, warmup-step computation
  VERSIONS.json      python / torch / transformers / peft / safetensors versions

tests/golden/<variant>/lora/  (variant in dense_kv, e2b, e4b, moe)
  initial/           peft_model.save_pretrained(): adapter_config.json + adapter_model.safetensors
                     (LoraConfig r=4, alpha=8, dropout 0, target_modules="all-linear",
                     init_lora_weights=False, so B != 0), F64
  targets.json       modules PEFT wrapped, Linear modules it did not wrap
  grads.safetensors  d loss / d (every lora_A / lora_B weight) under the PEFT key, + loss [1]
  after_3_steps.safetensors  lora weights after 3 AdamW steps (GA 2, clipping), PEFT keys
  train.json         C (max_grad_norm), per-step lr, pre-clip norm, loss, ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import Gemma4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden  # noqa: E402  (fp64_throughout, VARIANTS, MIN_ROUTER_GAP)

import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
OPTIM_SEED = 20260501
LORA_SEED = 20260601
VARIANTS = list(make_golden.VARIANTS)  # dense_kv, e2b, e4b, moe

LORA_R, LORA_ALPHA = 4, 8
TRAIN = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup=1, steps=3,
             clip_fraction=0.5)


def log(*a):
    print("[make_train_golden]", *a, flush=True)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- A: optim
def optim_adamw(out: Path):
    g = torch.Generator().manual_seed(OPTIM_SEED)
    shapes = [(4, 5), (7,), (3, 3)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # per-step gradient scales: total norm of N(0,1) grads over 41 elements is ~6.4, so scale
    # 1.0 clips hard (max_norm 0.5), 0.03 is well below the threshold, 0.12 is just above it
    scales = [1.0, 0.03, 0.12, 0.02]
    grads = [[s * torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes] for s in scales]

    params = [torch.nn.Parameter(t.clone()) for t in init]
    p0, p1, p2 = params
    opt = torch.optim.AdamW([{"params": [p0, p2], "weight_decay": 0.1},
                             {"params": [p1], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=4)
    tensors = {f"init_{i}": t.clone() for i, t in enumerate(init)}
    info = {"steps": []}
    for k in range(4):
        for i, p in enumerate(params):
            p.grad = grads[k][i].clone()
            tensors[f"g{k}_{i}"] = grads[k][i].clone()
        lrs = [grp["lr"] for grp in opt.param_groups]
        assert lrs[0] == lrs[1]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)
        for i, p in enumerate(params):
            tensors[f"clipped{k}_{i}"] = p.grad.detach().clone()
        opt.step()
        sched.step()
        for i, p in enumerate(params):
            tensors[f"after{k}_{i}"] = p.detach().clone()
            st = opt.state[p]
            tensors[f"exp_avg{k}_{i}"] = st["exp_avg"].clone()
            tensors[f"exp_avg_sq{k}_{i}"] = st["exp_avg_sq"].clone()
        tensors[f"lr{k}"] = torch.tensor([lrs[0]], dtype=torch.float64)
        tensors[f"norm{k}"] = norm.detach().double().reshape(1).clone()
        info["steps"].append({"lr": lrs[0], "pre_clip_norm": norm.item(), "clipped": norm.item() > 0.5})
    # independent re-computation from formats.md §5 (clip, then AdamW with decoupled decay)
    ps = [t.clone() for t in init]
    ms = [torch.zeros_like(t) for t in init]
    vs = [torch.zeros_like(t) for t in init]
    wds = [0.1, 0.0, 0.1]
    b1, b2, eps = 0.9, 0.95, 1e-8
    for k in range(4):
        lam = k / 2 if k < 2 else max(0.0, 0.5 * (1 + math.cos(math.pi * (k - 2) / 2)))
        lr = 1e-2 * lam
        assert abs(lr - tensors[f"lr{k}"].item()) < 1e-18, (k, lr)
        total = math.sqrt(sum(float((g * g).sum()) for g in grads[k]))
        assert abs(total - tensors[f"norm{k}"].item()) < 1e-12 * total
        coef = min(0.5 / (total + 1e-6), 1.0)
        t = k + 1
        for i in range(3):
            gi = grads[k][i] * coef
            ps[i] = ps[i] * (1 - lr * wds[i])
            ms[i] = b1 * ms[i] + (1 - b1) * gi
            vs[i] = b2 * vs[i] + (1 - b2) * gi * gi
            denom = vs[i].sqrt() / math.sqrt(1 - b2 ** t) + eps
            ps[i] = ps[i] - (lr / (1 - b1 ** t)) * ms[i] / denom
            err = (ps[i] - tensors[f"after{k}_{i}"]).abs().max().item()
            assert err < 1e-14, (k, i, err)
    clipped = [s["clipped"] for s in info["steps"]]
    assert any(clipped) and not all(clipped), clipped
    assert all(v.dtype == torch.float64 for v in tensors.values())
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                str(out / "adamw.safetensors"), metadata={"format": "pt"})
    log("adamw:", [(round(s["lr"], 6), round(s["pre_clip_norm"], 4), s["clipped"]) for s in info["steps"]])
    return info


def optim_schedules(out: Path):
    T, W = 10, 3

    def lambdas(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        assert len(sched.lr_lambdas) == 1
        return [float(sched.lr_lambdas[0](s)) for s in range(T + 1)]

    res = {
        "T": T, "W": W, "s": list(range(T + 1)),
        "note": "lambda(s) = sched.lr_lambdas[0](s); the lr of optimizer update k (0-based) is base_lr*lambda(k)",
        "cosine_with_warmup": lambdas(lambda o: transformers.get_cosine_schedule_with_warmup(o, W, T)),
        "linear_with_warmup": lambdas(lambda o: transformers.get_linear_schedule_with_warmup(o, W, T)),
        "constant": lambdas(lambda o: transformers.get_constant_schedule(o)),
        "constant_with_warmup": lambdas(lambda o: transformers.get_constant_schedule_with_warmup(o, W)),
        "cosine_with_min_lr_0.1_with_warmup": lambdas(
            lambda o: transformers.get_cosine_with_min_lr_schedule_with_warmup(o, W, T, min_lr_rate=0.1)),
    }
    # transformers >= 5: warmup_steps < 1 is a ratio (there is no warmup_ratio argument any more)
    ws = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in (0.03,):
            args = transformers.TrainingArguments(output_dir=tmp, warmup_steps=ratio, report_to=[])
            ws[str(ratio)] = {str(t): args.get_warmup_steps(t) for t in (7, 50, 100, 101, 1000)}
    res["warmup_steps_from_ratio"] = ws
    res["warmup_steps_rule"] = ("TrainingArguments.get_warmup_steps(T): int(warmup_steps) if warmup_steps >= 1 "
                                "else math.ceil(T * warmup_steps)")
    assert ws["0.03"]["100"] == 3 and ws["0.03"]["1000"] == 30
    (out / "schedules.json").write_text(dumps(res))
    return res


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "generator": "scripts/golden/make_train_golden.py",
    }


# --------------------------------------------------------------------------- B: LoRA
def load_base(variant: str) -> Gemma4ForCausalLM:
    """fp32 checkpoint loaded as in make_golden (fp32 RoPE tables), then cast to fp64."""
    m = Gemma4ForCausalLM.from_pretrained(str(GOLDEN / variant), attn_implementation="eager",
                                          experts_implementation="eager", dtype=torch.float32)
    m = m.double().eval()
    # recorded in adapter_config.json as base_model_name_or_path
    m.config._name_or_path = f"tests/golden/{variant}"
    m.name_or_path = f"tests/golden/{variant}"
    return m


def lora_config() -> LoraConfig:
    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      init_lora_weights=False, task_type="CAUSAL_LM")


def peft_key(param_name: str) -> str:
    """In-memory parameter name -> the key PEFT saves (adapter name 'default' removed)."""
    for ab in ("lora_A", "lora_B"):
        param_name = param_name.replace(f".{ab}.default.weight", f".{ab}.weight")
    assert ".default." not in param_name, param_name
    return param_name


def lora_params(pm) -> dict[str, torch.nn.Parameter]:
    out = {peft_key(n): p for n, p in pm.named_parameters() if p.requires_grad}
    assert all((".lora_A." in k or ".lora_B." in k) for k in out), list(out)
    return out


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    assert logits.dtype == torch.float64
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             shifted_labels(labels).reshape(-1),
                                             ignore_index=-100, reduction="sum")


class RouterGap:
    """Smallest top-k vs (k+1)-th router probability gap over every forward it has seen."""

    def __init__(self, model):
        self.min_gap = math.inf
        self.hooks = []
        inner = model.get_base_model().model
        if not inner.config.enable_moe_block:
            return
        k = inner.config.top_k_experts
        for layer in inner.layers:
            self.hooks.append(layer.router.register_forward_hook(
                lambda m, inp, out: self._add(out[0], k)))

    def _add(self, probs, k):
        srt = probs.detach().sort(-1, descending=True).values
        self.min_gap = min(self.min_gap, (srt[..., k - 1] - srt[..., k]).min().item())

    def remove(self):
        for h in self.hooks:
            h.remove()


def check_fp64(pm):
    bad = [n for n, p in pm.named_parameters() if p.dtype != torch.float64]
    bad += [n for n, b in pm.named_buffers() if b.is_floating_point() and b.dtype != torch.float64
            and not n.endswith("inv_freq")]
    assert not bad, bad


def lora_variant(variant: str, vi: int, out_root: Path) -> dict:
    fwd = safetensors.torch.load_file(str(GOLDEN / variant / "forward.safetensors"))
    ids, labels = fwd["input_ids"], fwd["labels"]
    n_targets = int((shifted_labels(labels) != -100).sum())
    n_rows = [int((shifted_labels(labels[b:b + 1]) != -100).sum()) for b in range(ids.shape[0])]
    ldir = out_root / variant / "lora"
    if ldir.exists():
        shutil.rmtree(ldir)
    ldir.mkdir(parents=True)

    seed = LORA_SEED + 1000 * vi
    while True:
        # ---------------------------------------------------------------- initial adapter
        base = load_base(variant)
        linear = sorted(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear))
        # sanity: with the adapter disabled this is exactly make_golden's fp64 run
        with torch.no_grad(), make_golden.fp64_throughout():
            logits = base(input_ids=ids, use_cache=False).logits
        base_loss = (ce_sum(logits, labels) / n_targets).item()
        assert base_loss == fwd["loss_fp64"].item(), (base_loss, fwd["loss_fp64"].item())

        torch.manual_seed(seed)
        pm = get_peft_model(base, lora_config())
        check_fp64(pm)
        gap = RouterGap(pm)
        wrapped = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                         if isinstance(m, peft.tuners.lora.LoraLayer))
        params = lora_params(pm)

        # ---------------------------------------------------------------- gradients
        pm.zero_grad(set_to_none=True)
        with torch.enable_grad(), make_golden.fp64_throughout():
            logits = pm(input_ids=ids, use_cache=False).logits
            assert logits.dtype == torch.float64
            loss = ce_sum(logits, labels) / n_targets
            loss.backward()
        grads = {}
        for k, p in params.items():
            assert p.grad is not None and p.grad.dtype == torch.float64, k
            assert p.grad.abs().max().item() > 0, f"zero gradient for {k}"
            grads[k] = p.grad.detach().clone().contiguous()
        full_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
        init_state = {k: p.detach().clone() for k, p in params.items()}
        gap_init = gap.min_gap
        gap.remove()
        if gap_init >= make_golden.MIN_ROUTER_GAP:
            break
        log(f"{variant}: lora seed {seed} router gap {gap_init:.2e} too small, next seed")
        seed += 1

    init_dir = ldir / "initial"
    # "all-linear" is expanded by PEFT into a *set* of module-name suffixes, which it writes as a
    # list in set iteration order (depends on PYTHONHASHSEED). Sort it so that the file is
    # reproducible; the matching semantics (name == entry or name ends with "." + entry) are the same.
    cfg = pm.peft_config["default"]
    expanded = sorted(cfg.target_modules)
    cfg.target_modules = expanded
    pm.save_pretrained(str(init_dir))
    readme = init_dir / "README.md"
    if readme.exists():  # boilerplate model card, not part of the adapter format
        readme.unlink()
    saved = safetensors.torch.load_file(str(init_dir / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(params), (sorted(set(saved) ^ set(params)))[:10]
    assert sorted(get_peft_model_state_dict(pm)) == sorted(params)
    for k, v in saved.items():
        assert v.dtype == torch.float64 and torch.equal(v, init_state[k]), k
    # independent check of PEFT's LoRA semantics (formats.md §2): merging W += (alpha/r)·B@A into
    # a fresh fp64 base gives the same loss
    merged = load_base(variant)
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for w in wrapped:
            A = init_state[f"base_model.model.{w}.lora_A.weight"]
            B = init_state[f"base_model.model.{w}.lora_B.weight"]
            mods[w].weight += (LORA_ALPHA / LORA_R) * (B @ A)
        with make_golden.fp64_throughout():
            logits = merged(input_ids=ids, use_cache=False).logits
        merged_loss = (ce_sum(logits, labels) / n_targets).item()
    assert abs(merged_loss - loss.item()) < 1e-12, (merged_loss, loss.item())
    del merged, mods
    grads["loss"] = loss.detach().reshape(1).clone()
    safetensors.torch.save_file(grads, str(ldir / "grads.safetensors"), metadata={"format": "pt"})
    del grads["loss"]

    bases_targeted = {
        "per_layer_model_projection": any(w.endswith("per_layer_model_projection") for w in wrapped),
        "per_layer_input_gate": any(w.endswith("per_layer_input_gate") for w in wrapped),
        "per_layer_projection": any(w.endswith("per_layer_projection") for w in wrapped),
        "router.proj": any(w.endswith("router.proj") for w in wrapped),
        "lm_head": "lm_head" in wrapped,
    }
    kinds = sorted({".".join(p if not p.isdigit() else "N" for p in w.split(".")) for w in wrapped})
    targets = {
        "target_modules": "all-linear",
        "target_modules_expanded_by_peft": expanded,
        "wrapped": wrapped,
        "wrapped_kinds": kinds,
        "num_wrapped": len(wrapped),
        "linear_not_wrapped": sorted(set(linear) - set(wrapped)),
        "flags": {**{f"wrapped_{k.replace('.', '_')}": v for k, v in bases_targeted.items()},
                  "lm_head_is_tied_to_embed_tokens":
                      pm.get_base_model().lm_head.weight is pm.get_base_model().model.embed_tokens.weight},
        "shapes": {k: list(p.shape) for k, p in sorted(params.items())},
    }
    (ldir / "targets.json").write_text(dumps(targets))

    # ---------------------------------------------------------------- training (3 steps, GA 2)
    base = load_base(variant)
    pm = PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
    check_fp64(pm)
    gap = RouterGap(pm)
    params = lora_params(pm)
    assert sorted(params) == sorted(init_state)
    for k, p in params.items():
        assert torch.equal(p.detach(), init_state[k]), k
    plist = [params[k] for k in sorted(params)]
    opt = torch.optim.AdamW(plist, lr=TRAIN["lr"], betas=TRAIN["betas"], eps=TRAIN["eps"],
                            weight_decay=TRAIN["weight_decay"], foreach=False)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=TRAIN["warmup"],
                                                         num_training_steps=TRAIN["steps"])
    # C: half of the first step's pre-clip norm (the step-0 accumulated gradient is the gradient
    # of the token mean over both rows, i.e. grads.safetensors), rounded to 3 significant digits
    C = float(f"{TRAIN['clip_fraction'] * full_norm:.3g}")
    steps = []
    opt.zero_grad(set_to_none=True)
    for step in range(TRAIN["steps"]):
        lr = opt.param_groups[0]["lr"]
        micro = []
        for b in range(ids.shape[0]):
            with torch.enable_grad(), make_golden.fp64_throughout():
                logits = pm(input_ids=ids[b:b + 1], use_cache=False).logits
                ml = ce_sum(logits, labels[b:b + 1]) / n_targets
                ml.backward()
            micro.append(ml.item())
        if step == 0:
            acc_vs_full = max((params[k].grad - grads[k]).abs().max().item() for k in params)
            assert acc_vs_full < 1e-12, acc_vs_full
        norm = torch.nn.utils.clip_grad_norm_(plist, max_norm=C).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append({"step": step, "lr": lr, "pre_clip_norm": norm, "clipped": norm > C,
                      "clip_coef": min(C / (norm + 1e-6), 1.0),
                      "micro_losses": micro, "loss": sum(micro)})
    gap.remove()
    assert any(s["clipped"] for s in steps)
    after = {k: p.detach().clone().contiguous() for k, p in sorted(params.items())}
    sd = get_peft_model_state_dict(pm)
    assert sorted(sd) == sorted(after)
    for k in after:
        assert torch.equal(sd[k], after[k]) and after[k].dtype == torch.float64
    safetensors.torch.save_file(after, str(ldir / "after_3_steps.safetensors"), metadata={"format": "pt"})
    max_delta = max((after[k] - init_state[k]).abs().max().item() for k in after)
    train = {
        "max_grad_norm_C": C,
        "C_rule": "float(f'{0.5 * step-0 pre-clip norm:.3g}')",
        "optimizer": {"type": "torch.optim.AdamW", "lr": TRAIN["lr"], "betas": list(TRAIN["betas"]),
                      "eps": TRAIN["eps"], "weight_decay": TRAIN["weight_decay"], "foreach": False,
                      "param_groups": 1},
        "schedule": {"type": "get_cosine_schedule_with_warmup", "num_warmup_steps": TRAIN["warmup"],
                     "num_training_steps": TRAIN["steps"]},
        "gradient_accumulation_steps": 2,
        "micro_batches": "micro-batch b = row b of forward.safetensors input_ids/labels ([1,24]); same batch every step",
        "num_items_in_batch_N": n_targets,
        "targets_per_micro_batch": n_rows,
        "micro_loss": "sum over the micro-batch's shifted targets of CE (float64) / N",
        "loss": "sum of the micro-losses of the step (= token mean over both rows)",
        "clipping": "torch.nn.utils.clip_grad_norm_(lora params, max_norm=C) after both backwards, before opt.step()",
        "steps": steps,
        "full_batch_loss_initial": loss.item(),
        "full_batch_loss_base_model_no_lora": base_loss,
        "merged_check_abs_diff": abs(merged_loss - loss.item()),
        "max_abs_step0_accumulated_minus_full_batch_grad": acc_vs_full,
        "max_abs_weight_change": max_delta,
        "lora_seed": seed,
        "router_min_topk_prob_gap_initial": None if math.isinf(gap_init) else gap_init,
        "router_min_topk_prob_gap_training": None if math.isinf(gap.min_gap) else gap.min_gap,
    }
    if not math.isinf(gap.min_gap):
        assert gap.min_gap >= make_golden.MIN_ROUTER_GAP, gap.min_gap
    (ldir / "train.json").write_text(dumps(train))
    size = sum(p.stat().st_size for p in ldir.rglob("*") if p.is_file())
    log(f"{variant}: wrapped {len(wrapped)} modules, {sum(p.numel() for p in after.values())} lora params, "
        f"loss {loss.item():.6f} (base {base_loss:.6f}), C={C}, "
        f"norms {[round(s['pre_clip_norm'], 5) for s in steps]}, lr {[s['lr'] for s in steps]}, "
        f"{size / 1024:.0f} KiB")
    return {"wrapped": len(wrapped), **bases_targeted}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(GOLDEN))
    ap.add_argument("--only", choices=["optim", "lora"], default=None)
    args = ap.parse_args()
    out = Path(args.out)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.only in (None, "optim"):
        od = out / "optim"
        od.mkdir(parents=True, exist_ok=True)
        optim_adamw(od)
        optim_schedules(od)
        (od / "VERSIONS.json").write_text(dumps(versions()))
    if args.only in (None, "lora"):
        for vi, variant in enumerate(VARIANTS):
            lora_variant(variant, vi, out)


if __name__ == "__main__":
    main()
