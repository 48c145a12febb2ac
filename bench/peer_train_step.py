"""The same training step as bench/train_step.cpp with transformers + PEFT on the CPU:
a checkpoint loaded in fp32 (bnb's CPU path stands in for 4-bit only when available, so the
peer trains LoRA on the fp32 base: the cheaper case for it), LoRA r 16 all-linear, gradient
checkpointing, AdamW; one warm-up step, then tokens/s and peak RSS as one JSON line.

  python bench/peer_train_step.py MODEL_DIR [S ROWS STEPS]
"""
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma4ForCausalLM


def main():
    d = sys.argv[1]
    S, rows, steps = (int(x) for x in (sys.argv[2:5] + ["256", "4", "5"][len(sys.argv[2:5]):]))
    torch.set_num_threads(2)
    model = Gemma4ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = (torch.arange(rows * S) * 7919 + 13) % model.config.vocab_size
    ids = ids.reshape(rows, S)

    def step():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": "transformers+peft", "model": d, "tokens_per_step": rows * S,
                      "tokens_per_s": rows * S * steps / secs, "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
