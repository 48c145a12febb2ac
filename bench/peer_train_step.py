"""The same training step as bench/train_step.cpp with transformers + PEFT on the CPU (the
peer): LoRA r 16 all-linear, gradient checkpointing, AdamW; one warm-up step, then tokens/s
and peak RSS as one JSON line.

  python bench/peer_train_step.py MODEL_DIR [S ROWS STEPS [fp32|bf16 [lora|qlora]]]

fp32 trains on the fp32 base; bf16 runs forward and loss under
torch.autocast("cpu", dtype=torch.bfloat16), as a user with a bf16-capable CPU would.
qlora loads the projections in 4-bit NF4 with double quantization through bitsandbytes
(BitsAndBytesConfig, compute dtype bf16 under bf16, else fp32), where its CPU backend can;
when it cannot, the line says why ({"error": ...}) instead of a rate.
"""
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma4ForCausalLM


def load(d, precision, adapter):
    if adapter == "lora":
        return Gemma4ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    model = Gemma4ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa",
                                              quantization_config=q, device_map="cpu")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def main():
    d = sys.argv[1]
    args = sys.argv[2:]
    S, rows, steps = (int(x) for x in (args[:3] + ["256", "4", "5"][len(args[:3]):]))
    precision = args[3] if len(args) > 3 else "fp32"
    adapter = args[4] if len(args) > 4 else "lora"
    assert precision in ("fp32", "bf16") and adapter in ("lora", "qlora"), "fp32|bf16, lora|qlora"
    torch.set_num_threads(2)
    head = {"impl": "transformers+peft", "model": d, "precision": precision, "adapter": adapter}
    try:
        model = load(d, precision, adapter)
        model.gradient_checkpointing_enable()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        ids = ((torch.arange(rows * S) * 7919 + 13) % model.config.vocab_size).reshape(rows, S)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad()

        step()
    except Exception as e:  # e.g. bitsandbytes without a CPU 4-bit path
        print(json.dumps({**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}))
        return
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**head, "tokens_per_step": rows * S, "tokens_per_s": rows * S * steps / secs,
                      "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
