"""Multiple-choice option log-likelihoods from transformers on the tiny golden checkpoints,
recorded for torchless-eval's multiple-choice scoring (train/eval/evaluate.h). For each variant: a
few items of random token ids, a context and four options of 1–5 tokens, and for each option
Σ log p(option token | context, earlier option tokens) from Gemma4ForCausalLM's logits
(log_softmax of the soft-capped logits), in fp32 and in fp64 (HF's fp32 islands lifted, as
make_golden.py's fp64 run does), plus the first-step logits of
the context (what KV-cached generation's prefill must reproduce).

  /work/pyenv/bin/python scripts/golden/make_mc_golden.py
"""
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import Gemma4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import fp64_throughout  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/golden"
OUT = GOLDEN / "mc"
VARIANTS = ["dense_kv", "e2b", "e4b", "moe"]
CONTEXT_LENGTHS = [4, 9, 17]


def option_loglik(model, context, option):
    ids = torch.tensor([context + option])
    fp64 = fp64_throughout() if model.dtype == torch.float64 else contextlib.nullcontext()
    with torch.no_grad(), fp64:
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(context)
    return float(sum(logp[n - 1 + j, t] for j, t in enumerate(option)))


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "variants": {}}
    for variant in VARIANTS:
        models = {dt: Gemma4ForCausalLM.from_pretrained(str(GOLDEN / variant), dtype=dt,
                                                        attn_implementation="eager",
                                                        experts_implementation="eager").eval()
                  for dt in (torch.float32, torch.float64)}
        vocab = models[torch.float32].config.vocab_size
        gen = torch.Generator().manual_seed(4321)
        items = []
        for n in CONTEXT_LENGTHS:
            context = torch.randint(3, vocab, (n,), generator=gen).tolist()
            options = [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in (1, 3, 2, 5)]
            item = {"context": context, "options": options,
                    "loglik_fp32": [option_loglik(models[torch.float32], context, o) for o in options],
                    "loglik_fp64": [option_loglik(models[torch.float64], context, o) for o in options]}
            with torch.no_grad():
                item["last_logits_fp32"] = models[torch.float32](torch.tensor([context])).logits[0, -1].tolist()
            items.append(item)
        record["variants"][variant] = items
        print(variant, [i["loglik_fp64"] for i in items])
    (OUT / "options.json").write_text(json.dumps(record) + "\n")
    # Register the fixture in the manifest (tests/cli/golden_manifest.sh checks it).
    manifest = GOLDEN / "MANIFEST.sha256"
    rel = "mc/options.json"
    lines = [l for l in manifest.read_text().splitlines() if not l.endswith("  " + rel)]
    lines.append(f"{hashlib.sha256((OUT / 'options.json').read_bytes()).hexdigest()}  {rel}")
    manifest.write_text("\n".join(sorted(lines, key=lambda l: Path(l.split("  ", 1)[1]).parts)) + "\n")


if __name__ == "__main__":
    main()
