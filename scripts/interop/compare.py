"""Compares llama.cpp (scripts/interop/llama_dump.cpp) with torchless-forward --output on one
model; run by scripts/interop/llama-cpp.sh, which makes the files in WORK. Needs numpy and
safetensors only. Prints one line per check and a JSON summary; exits 1 if a check fails.

  python compare.py WORK
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open

W = Path(sys.argv[1])
# max|llama − torchless| / max|torchless| for the f32 GGUF (f32 K/V cache, flash attention off).
# What is left there is ggml-cpu's GELU table (GGML_GELU_FP16): the gate's input rounded to
# fp16 and GELU read from an fp16 table, a relative error of up to fp16's unit roundoff,
# 2^-11 ≈ 4.9e-4, per element. An independent run over ten models and two prompts each found
# 6.1e-5 to 2.84e-4 with stock llama.cpp and ≤ 1.1e-6 with the table compiled out
# (docs/interop.md), so the table accounts for all of it and the bound is that roundoff: a
# deviation above one fp16 rounding of the largest logit is not the table's.
LOGIT_TOL = 2.0 ** -11


def ids(name):
    return [int(x) for x in (W / name).read_text().split()]


def meta_text(name):
    with safe_open(str(W / name), "np") as f:
        return f.metadata()["text"]


results, failed = {}, []


def report(key, ok, line, **numbers):
    results[key] = {"ok": ok, **numbers}
    print(("ok   " if ok else "FAIL ") + line)
    if not ok:
        failed.append(key)


# Tokenizer ids: the prompt and the tricky text, llama_tokenize against torchless' encode.
for what in ("prompt", "tricky"):
    ours = load_file(str(W / f"tl_{what}.safetensors"))["input_ids"][0].tolist()
    theirs = ids(f"llama_{what}_ids.txt")
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    report(f"tokenizer_{what}", ours == theirs,
           f"tokenizer ids on the {what} text: {len(ours)} torchless, {len(theirs)} llama.cpp"
           + ("" if ours == theirs else f", first difference at {first}"), tokens=len(ours))

# Chat template: what each feeds the model. torchless' renderer writes the template's <bos>;
# llama.cpp's common_chat_templates_apply strips it and llama-cli's tokenizer adds the BOS back
# (add_special=true, as the GGUF's add_bos_token says), so the token ids are compared; the
# strings are recorded, compared after torchless' leading <bos>.
ours_ids = load_file(str(W / "tl_chat.safetensors"))["input_ids"][0].tolist()
theirs_ids = ids("llama_chat_ids.txt")
ours, theirs = meta_text("tl_chat.safetensors"), (W / "llama_chat.txt").read_text()
bos = "<bos>"
ours_after_bos = ours[len(bos):] if ours.startswith(bos) and not theirs.startswith(bos) else ours
same_text = ours_after_bos == theirs
first = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b), min(len(ours_ids), len(theirs_ids)))
report("chat_template", ours_ids == theirs_ids,
       f"chat template token ids: {len(ours_ids)} torchless, {len(theirs_ids)} llama.cpp (rendered, then tokenized "
       "as llama-cli does)" + ("" if ours_ids == theirs_ids else f", first difference at {first}")
       + f"; text {len(theirs)} bytes, " + ("identical" if same_text else f"differs (torchless {ours!r} / llama.cpp {theirs!r})")
       + (" after torchless' leading <bos>" if ours_after_bos != ours else ""),
       tokens=len(ours_ids), text_identical=same_text)

# Logits of every prompt position, f32 and Q8_0 GGUFs against torchless fp32.
tl = load_file(str(W / "tl_prompt.safetensors"))
ref = tl["logits"][0].astype(np.float64)
S, V = ref.shape
for q in ("f32", "q8_0"):
    got = np.fromfile(W / f"llama_{q}_logits.f32", dtype=np.float32).reshape(S, V).astype(np.float64)
    d = float(np.abs(got - ref).max() / np.abs(ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    ok = d <= LOGIT_TOL if q == "f32" else True  # Q8_0: recorded, not bounded
    report(f"logits_{q}", ok, f"logits {q}: max|diff|/max|ref| {d:.3g} over {S} positions"
           + (f" (bound {LOGIT_TOL:g})" if q == "f32" else " (recorded)") + f", argmax agrees at {agree:.3f}",
           rel=d, argmax_agreement=agree, positions=S)

# Greedy tokens: llama.cpp's greedy continuation, step by step through its KV cache, must be
# torchless' argmax at every step (torchless run on the whole continued sequence).
prompt_len = S
for q in ("f32", "q8_0"):
    seq = ids(f"llama_{q}_greedy.txt")
    gen = load_file(str(W / f"tl_greedy_{q}.safetensors"))["logits"][0]
    want = gen[prompt_len - 1:-1].argmax(-1).tolist()
    theirs = seq[prompt_len:]
    top2 = np.sort(gen[prompt_len - 1:-1], axis=-1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    same = want == theirs
    ok = same if q == "f32" else True
    report(f"greedy_{q}", ok, f"greedy {q}: {len(theirs)} tokens after a {prompt_len}-token prompt, "
           + ("identical to torchless' argmax" if same else
              f"{sum(a != b for a, b in zip(want, theirs))} differ from torchless' argmax")
           + f" (smallest top-2 logit margin {margin:.3g})" + ("" if q == "f32" else " (recorded)"),
           tokens=len(theirs), identical=same, min_margin=margin)

(W / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
print(json.dumps({"failed": failed}))
sys.exit(1 if failed else 0)
