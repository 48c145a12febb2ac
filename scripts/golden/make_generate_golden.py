"""Greedy decoding with the real transformers `generate` (KV cache on, do_sample=False) on
the tiny golden checkpoints, recorded for torchless's greedy generator (used by the trainer's
before/after generation check, recipes.md §2). For each variant: a few prompts of random
token ids and the 16 tokens HF's greedy search appends. The script also asserts that
use_cache=False generates the same tokens, and records the smallest gap between the best and
second-best logit over all steps, so that a C++ fp32 mismatch cannot be a near-tie.

  /tmp/gvenv/bin/python scripts/golden/make_generate_golden.py
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import Gemma4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/golden/generate"
VARIANTS = ["dense_kv", "e2b", "e4b", "moe"]
NEW_TOKENS = 16
PROMPT_LENGTHS = [5, 11, 23]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "new_tokens": NEW_TOKENS,
              "variants": {}}
    for variant in VARIANTS:
        model = Gemma4ForCausalLM.from_pretrained(str(ROOT / "tests/golden" / variant), dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens, no early stop
        model.generation_config.pad_token_id = 0
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1234)
        cases = []
        for n in PROMPT_LENGTHS:
            prompt = torch.randint(3, vocab, (1, n), generator=gen)
            kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True)
            with torch.no_grad():
                cached = model.generate(prompt, use_cache=True, **kw)
                uncached = model.generate(prompt, use_cache=False, **kw)
            assert torch.equal(cached.sequences, uncached.sequences), variant
            margin = min(float((s[0].topk(2).values[0] - s[0].topk(2).values[1])) for s in cached.scores)
            assert margin > 1e-4, (variant, n, margin)
            cases.append({"prompt": prompt[0].tolist(), "generated": cached.sequences[0, n:].tolist(),
                          "min_top2_margin": margin})
        record["variants"][variant] = cases
        print(variant, [c["min_top2_margin"] for c in cases])
    lines = [json.dumps({k: v for k, v in record.items() if k != "variants"})[:-1] + ', "variants": {']
    for i, (variant, cases) in enumerate(record["variants"].items()):
        body = ",\n  ".join(json.dumps(c) for c in cases)
        lines.append(f' "{variant}": [\n  {body}]' + ("," if i + 1 < len(record["variants"]) else "}}"))
    (OUT / "greedy.json").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
