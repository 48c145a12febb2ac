#!/usr/bin/env python3
"""Golden fixtures for distillation from the parent (issue 24): the loss

    L = ((1 − α)·Σ CE + α·T²·Σ KL(p_parent,T ‖ p_student,T)) / N

over the N trained targets (HF's shifted labels, −100 ignored), and d L / d (every LoRA A and
B of the student), in float64, by PyTorch autograd through transformers + PEFT.

    python scripts/golden/make_distill_golden.py            # writes tests/golden/distill/

Parent: tests/golden/e4b (12 layers, per-layer embeddings, the last 4 KV-shared, soft-cap 30).
Student: its passthrough upscale with slices 0:6,2:8,8:12 (16 layers), re-sequenced in Python
by make_upscale_golden.resequence (independent of torchless-surgery), with a PEFT LoRA
(r 2, alpha 4, all-linear, dropout 0, init_lora_weights=False so that B ≠ 0 and the student
differs from the parent). Inputs: tests/golden/e4b/forward.safetensors (B 2, S 24).

Both models' logits are HF's, i.e. after the soft-cap 30·tanh(z/30). Per target row, with
a = t/T, b = s/T (t the parent's, s the student's logits):
  whole vocabulary:  KL = Σ_j p_j (log p_j − log q_j),  p = softmax(a), q = softmax(b)
  top k (Axolotl's KD loss, top_k_before_softmax off): S = the parent's top k of a,
                     p = softmax over S of a (renormalised), log q = log_softmax(b) over the
                     whole vocabulary gathered at S;  KL = Σ_{j∈S} p_j (log p_j − log q_j)
Each KL is computed twice (by hand and by torch.nn.functional.kl_div) and they must agree.

Cases (cases.json): full (α 0.7, T 2, whole vocabulary), topk (α 0.5, T 1.5, top 20),
pure (α 1, T 1, whole vocabulary: no cross-entropy at all).

tests/golden/distill/
  adapter/               peft save_pretrained (adapter_config.json, adapter_model.safetensors, F64)
  <case>.safetensors     loss [1], ce_sum [1], kl_sum [1], count [1] (I64), and every lora_A /
                         lora_B gradient under its PEFT key (F64)
  cases.json             α, T, top_k per case, the slices, N, and the numbers above
  VERSIONS.json          versions used

Deterministic (fixed seeds, one thread): two runs write byte-identical files.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden  # noqa: E402  (fp64_throughout, write_manifest)
import make_upscale_golden  # noqa: E402  (resequence, SLICES: the independent re-sequencing)

import peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
OUT = GOLDEN / "distill"
PARENT = GOLDEN / "e4b"
LORA_SEED = 20261124
CASES = {
    "full": {"alpha": 0.7, "temperature": 2.0, "top_k": 0},
    "topk": {"alpha": 0.5, "temperature": 1.5, "top_k": 20},
    "pure": {"alpha": 1.0, "temperature": 1.0, "top_k": 0},
}


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]


def load_parent() -> Gemma4ForCausalLM:
    m = Gemma4ForCausalLM.from_pretrained(str(PARENT), attn_implementation="eager", dtype=torch.float32)
    return m.double().eval()


def load_student() -> Gemma4ForCausalLM:
    cfg, sd = make_upscale_golden.resequence()
    cfg.pop("transformers_version", None)
    config = Gemma4TextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    m = Gemma4ForCausalLM(config)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    m.tie_weights()
    return m.double().eval()  # the RoPE tables stay the fp32-computed ones, as in make_golden


def kl_terms(s: torch.Tensor, t: torch.Tensor, T: float, top_k: int):
    """Per-row KL (rows of s, t: [R, V]) by hand and by kl_div; both must agree."""
    b = torch.log_softmax(s / T, dim=-1)
    a = t / T
    if top_k == 0:
        logp = torch.log_softmax(a, dim=-1)
        logq = b
    else:
        vals, idx = torch.topk(a, top_k, dim=-1)
        logp = vals - torch.logsumexp(vals, dim=-1, keepdim=True)
        logq = torch.gather(b, -1, idx)
    by_hand = (logp.exp() * (logp - logq)).sum(-1)
    by_torch = torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    assert (by_hand - by_torch).abs().max().item() < 1e-12
    return by_hand


def main():
    torch.set_num_threads(1)
    fwd = safetensors.torch.load_file(str(PARENT / "forward.safetensors"))
    ids, labels = fwd["input_ids"], fwd["labels"]
    target = shifted(labels).reshape(-1)
    counted = target != -100
    N = int(counted.sum())

    parent = load_parent()
    with torch.no_grad(), make_golden.fp64_throughout():
        t_logits = parent(input_ids=ids, use_cache=False).logits.reshape(-1, parent.config.vocab_size)
    assert t_logits.dtype == torch.float64

    torch.manual_seed(LORA_SEED)
    student = load_student()
    pm = get_peft_model(student, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    bad = [n for n, p in pm.named_parameters() if p.dtype != torch.float64]
    assert not bad, bad
    params = {n.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight"): p
              for n, p in pm.named_parameters() if p.requires_grad}
    assert all(".lora_A." in k or ".lora_B." in k for k in params)

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    cfg = pm.peft_config["default"]
    cfg.target_modules = sorted(cfg.target_modules)  # a set: sorted, so the file is reproducible
    pm.save_pretrained(str(OUT / "adapter"))
    (OUT / "adapter" / "README.md").unlink(missing_ok=True)

    # The student without its adapter is the parent re-sequenced: the parent's loss differs.
    summary = {"parent": "tests/golden/e4b", "slices": ",".join(f"{a}:{b}" for a, b in make_upscale_golden.SLICES),
               "lora": {"r": 2, "alpha": 4, "target_modules": "all-linear", "init_lora_weights": False},
               "N": N, "cases": {}}
    for name, c in CASES.items():
        alpha, T, k = c["alpha"], c["temperature"], c["top_k"]
        pm.zero_grad(set_to_none=True)
        with torch.enable_grad(), make_golden.fp64_throughout():
            s_logits = pm(input_ids=ids, use_cache=False).logits.reshape(-1, parent.config.vocab_size)
            assert s_logits.dtype == torch.float64
            ce = torch.nn.functional.cross_entropy(s_logits, target, ignore_index=-100, reduction="sum")
            kl = kl_terms(s_logits[counted], t_logits[counted], T, k).sum()
            loss = ((1 - alpha) * ce + alpha * T * T * kl) / N
            loss.backward()
        out = {"loss": loss.detach().reshape(1).clone(), "ce_sum": ce.detach().reshape(1).clone(),
               "kl_sum": kl.detach().reshape(1).clone(), "count": torch.tensor([N], dtype=torch.int64)}
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().max().item() > 0, key
            out[key] = p.grad.detach().clone().contiguous()
        safetensors.torch.save_file(out, str(OUT / f"{name}.safetensors"), metadata={"format": "pt"})
        summary["cases"][name] = {**c, "loss": loss.item(), "ce_sum": ce.item(), "kl_sum": kl.item()}
        print(f"{name}: loss {loss.item():.12f} ce_sum {ce.item():.6f} kl_sum {kl.item():.6f}")
    (OUT / "cases.json").write_text(json.dumps(summary, indent=2) + "\n")
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__, "generator": "scripts/golden/make_distill_golden.py"}
    (OUT / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    make_golden.write_manifest(GOLDEN)
    print(f"distillation golden written to {OUT}")


if __name__ == "__main__":
    main()
