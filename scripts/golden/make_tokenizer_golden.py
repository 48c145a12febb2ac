#!/usr/bin/env python3
"""Builds the tiny Gemma-4-style tokenizer of torchless and the tokenizer / chat-template golden
fixtures.

    apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb /tmp/jargon   # the corpus
    /tmp/gvenv/bin/python scripts/golden/make_tokenizer_golden.py \
        --corpus /tmp/jargon/usr/share/doc/jargon-text/jargon.txt.gz

writes models/tiny/{tokenizer.json, tokenizer_config.json, chat_template.jinja} and
tests/golden/tokenizer/{encode,decode,variants,chats,VERSIONS}.json (see the README there).
Two runs give byte-identical files (tokenizers 0.23.3, transformers 5.23.0, jinja2 3.1.6).
`--check-against GEMMA4_TEMPLATE.jinja` also asserts that a reference Gemma 4 chat template
renders every fixture chat exactly like models/tiny/chat_template.jinja.

How the tokenizer is built (see models/tiny/SOURCE.md for the why):
  1. pieces: the `tokenizers` BPE trainer, on words split the way Gemma's SentencePiece model
     splits them (a word is a run of "▁" followed by letters or by punctuation; digits alone);
  2. layout: Gemma 4's ids for every special token below 4096, then the 256 byte pieces, the
     trained pieces, and the multimodal tokens at the top (their real ids are ≥ 255999);
  3. merges: `generate_merges(vocab, scores)` and `GemmaTokenizer(vocab, merges, ...)`, the same
     calls transformers' convert_gemma4_weights.py makes on the real SentencePiece vocab.
"""
import argparse
import gzip
import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path

import regex
import tokenizers
import transformers
from tokenizers import Tokenizer, models, trainers
from transformers import AutoTokenizer, GemmaTokenizer
from transformers.tokenization_utils_base import generate_merges

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models" / "tiny"
GOLDEN = REPO / "tests" / "golden" / "tokenizer"
CORPUS_DEFAULT = "/usr/share/doc/jargon-text/jargon.txt.gz"
CORPUS_SHA256 = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97"  # decompressed

VOCAB_SIZE = 4096
SP = "\u2581"  # ▁
# Gemma 4's ids (docs gemma4.md §7.1) for every special token that fits below VOCAB_SIZE.
FIXED = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
         46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
         50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>",
         100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>", 107: "\n"}
N_RESERVED = 108  # ids 0..107; the slots Gemma 4 uses for tokens we do not know are <unusedN>
# Real ids 255999, 256000, 258880..258884: kept in the same order at the top of the tiny vocab.
TOP = ["<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>"]
# The converter's extra_special_tokens, plus <|video|> (listed by the released tokenizer_config).
EXTRA_SPECIAL = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>",
    "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": '<|"|>',
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>", "etc_token": "<tool_call|>", "std_token": "<|tool>",
    "etd_token": "<tool|>", "video_token": "<|video|>"}
MIN_CHAR_COUNT = 8  # rarer characters stay out of the alphabet and fall back to bytes

# SentencePiece-like words: whitespace only as a prefix ("▁▁the", "▁("), digits alone, "\n" and
# other whitespace not trained ("\n" has its fixed id, the rest falls back to bytes).
WORD_RE = regex.compile(r"▁*[\p{L}\p{M}]+|▁*[^\p{L}\p{M}\p{N}\s▁]+|▁+|\p{N}|\s")

# Gemma 4's turn format for text chats, written for torchless (see SOURCE.md). {% generation %}
# marks what an SFT loss trains on: a model turn's text and its <turn|>, not the "\n" after it.
CHAT_TEMPLATE = r"""{#- torchless tiny: the Gemma 4 turn format for text chats (see SOURCE.md). -#}
{%- macro strip_thinking(text) -%}
    {%- set acc = namespace(text='') -%}
    {%- for chunk in text.split('<channel|>') -%}
        {%- set acc.text = acc.text + chunk.split('<|channel>')[0] -%}
    {%- endfor -%}
    {{- acc.text | trim -}}
{%- endmacro -%}
{%- if tools -%}{{- raise_exception('this template renders text chats only (no tools)') -}}{%- endif -%}
{%- for m in messages -%}
    {%- if m['role'] not in ['system', 'developer', 'user', 'assistant', 'model'] or m.get('tool_calls') -%}
        {{- raise_exception('unsupported message role: ' + m['role']) -}}
    {%- endif -%}
    {%- if m.get('content') is not none and m['content'] is not string -%}
        {{- raise_exception('message content must be a string') -}}
    {%- endif -%}
{%- endfor -%}
{%- set enable_thinking = enable_thinking | default(false) -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if enable_thinking or (messages and messages[0]['role'] in ['system', 'developer']) -%}
    {{- '<|turn>system\n' -}}
    {%- if enable_thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
    {%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
        {{- (messages[0].get('content') or '') | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1, prev_role=none) -%}
{%- for m in loop_messages -%}
    {%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- set next_role = none if loop.last else loop.nextitem['role'] -%}
    {%- set continues = role == 'model' and next_role == 'assistant' -%}
    {%- if not (role == 'model' and ns.prev_role == 'assistant') -%}
        {{- '<|turn>' + role + '\n' -}}
    {%- endif -%}
    {%- set thinking = message.get('reasoning') or message.get('reasoning_content') -%}
    {%- set body -%}
        {%- if thinking and loop.index0 > ns.last_user -%}
            {{- '<|channel>thought\n' + thinking + '\n<channel|>' -}}
        {%- endif -%}
        {%- if message.get('content') is string -%}
            {%- if role == 'model' -%}
                {{- strip_thinking(message['content']) -}}
            {%- else -%}
                {{- message['content'] | trim -}}
            {%- endif -%}
        {%- endif -%}
        {%- if not continues -%}{{- '<turn|>' -}}{%- endif -%}
    {%- endset -%}
    {%- if role == 'model' -%}
        {%- generation -%}{{- body -}}{%- endgeneration -%}
    {%- else -%}
        {{- body -}}
    {%- endif -%}
    {%- if not continues -%}{{- '\n' -}}{%- endif -%}
    {%- set ns.prev_role = message['role'] -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}{%- endif -%}
"""


def read_corpus(path: str) -> str:
    raw = Path(path).read_bytes()
    text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert digest == CORPUS_SHA256, f"{path}: sha256 {digest}, expected jargon-text 4.4.7-4.1"
    return text


def train_pieces(text: str, n_pieces: int) -> list[str]:
    """The trained pieces in trainer order: the alphabet (sorted), then merges as learned."""
    words = [w for w in WORD_RE.findall(text.replace(" ", SP)) if not w.isspace()]
    counts: dict[str, int] = {}
    for w in words:
        for c in w:
            counts[c] = counts.get(c, 0) + 1
    alphabet = sorted(c for c, n in counts.items() if n >= MIN_CHAR_COUNT)
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  max_token_length=16, special_tokens=[])
    tok.train_from_iterator(words, trainer)
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    assert len(pieces) == n_pieces, (len(pieces), n_pieces)
    return pieces


def build_tokenizer(text: str, out: Path) -> None:
    reserved = [FIXED.get(i) for i in range(N_RESERVED)]
    unused = iter(range(N_RESERVED))
    reserved = [t if t is not None else f"<unused{next(unused)}>" for t in reserved]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_trained = VOCAB_SIZE - N_RESERVED - len(byte_pieces) - len(TOP)
    trained = train_pieces(text, n_trained)
    assert not set(trained) & set(reserved)
    pieces = reserved + byte_pieces + trained + TOP
    assert len(pieces) == len(set(pieces)) == VOCAB_SIZE
    vocab = {p: i for i, p in enumerate(pieces)}
    # SentencePiece scores: 0 for control/user-defined/byte pieces, -rank for learned pieces;
    # the converter orders merges by these scores.
    scores = {p: 0.0 for p in pieces}
    for rank, p in enumerate(trained):
        scores[p] = -float(rank)
    merges = generate_merges(vocab, scores)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, padding_side="left",
                         extra_special_tokens=EXTRA_SPECIAL, chat_template=CHAT_TEMPLATE)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "tokenizer.json", out / "tokenizer.json")
        cfg = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        cfg["add_bos_token"] = False  # what the converter passes; spelled out for other readers
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


# --------------------------------------------------------------------------- fixtures
def fixture_lines(corpus: str) -> list[str]:
    lines = [
        "", "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
        "hacker ethic", "A kludge is a clever programming trick.",
        "안녕하세요, 세계!", "日本語のテキストです。カタカナとひらがな。", "中文字符",
        "I ❤️ tokenizers 🎉", "👨‍👩‍👧‍👦 family", "👍🏽 👋🏿 🇰🇷 🏳️‍🌈",
        "a b", " leading", "trailing ", "  both  ", " ", "\n", "\t", "\t\ttabs\tand\ttext",
        "line1\nline2\n\nline4\n", "crlf\r\nline", "\n\n\n  indented\n    more",
        "Ωmega ∑ ∫ ≈ ∞", "control \x00\x01\x1f\x7f chars", "é vs e\u0301", "nbsp\u00a0here",
        "ideographic\u3000space", "lower ▁ block a▁b", "\u2028line sep",
        "<|turn>user\nHi<turn|>\n", "<bos>text<eos>", "<|turn><|turn>", "<|turn", "turn|>",
        "<|think|>", '<|"|>quoted<|"|>', "<unused3>", "<mask>", "<|video|>x<|image|>",
        "<|tool_response>x<tool_response|>", "<|tool>y", "<<|channel>>", "<|channel>thought\n",
        "x" * 3000, "supercalifragilisticexpialidocious" * 60, "1234567890" * 30,
        "def f(x):\n    return x * 2  # comment", "    if (a && b) { c(); }",
        "http://www.catb.org/~esr/jargon/", "2 + 2 = 4; 3.14159; -17; 1e-9",
        "ALL CAPS SENTENCE", "MiXeD cAsE wOrDs",
    ]
    lines += ["a" + " " * n + "b" for n in range(2, 11)]
    lines += [" " * n + "x" + " " * n for n in range(1, 11)]
    # Random strings over pieces that stress merges, "▁" runs, byte fallback and added tokens.
    rng = random.Random(7)
    alpha = list("aeiotnsrhl  ") + ["  ", "\n", "\t", SP, "<|turn>", "<turn|>", "<|", "|>", "é",
                                    "한", "👍", "🏽", "\u200d", "─", "“", ".", "the", "ing", "0"]
    lines += ["".join(rng.choice(alpha) for _ in range(rng.randrange(1, 30))) for _ in range(40)]
    paragraphs = [p for p in corpus.split("\n\n") if len(p) > 200]
    lines += paragraphs[100:106]
    lines.append("\n\n".join(paragraphs[400:403]))
    return lines


def decode_cases(n_vocab: int) -> list[list[int]]:
    rng = random.Random(1234)
    cases = [[rng.randrange(n_vocab) for _ in range(rng.randrange(1, 40))] for _ in range(12)]
    b = lambda x: 108 + x  # noqa: E731  id of <0xXX>
    cases += [[b(0xED), b(0x95), b(0x9C)], [b(0xFF)], [b(0xE2), b(0x96), 500, b(0x41)],
              [105, b(0xC3), 106, b(0xA9)], [107, 107, 2, 1], [b(0xE2), b(0x96), b(0x81)], []]
    return cases


# Variants of models/tiny/tokenizer.json as RFC 6902 patches, so that the C++ tests can exercise
# the other settings its loader accepts (unk paths, Prepend, the Split behaviours, ...) without
# another large file. The C++ test applies the same patch with nlohmann::json::patch.
def variants() -> dict[str, list[dict]]:
    rep = lambda path, value: {"op": "replace", "path": path, "value": value}  # noqa: E731
    sp_replace = {"type": "Replace", "pattern": {"String": " "}, "content": SP}
    added = lambda i, text: {"op": "add", "path": "/added_tokens/-", "value": {  # noqa: E731
        "id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": False}}
    split = lambda pattern, b: {"type": "Split", "pattern": {"String": pattern},  # noqa: E731
                                "behavior": b, "invert": False}
    return {
        "no_byte_fallback": [rep("/model/byte_fallback", False)],
        "no_fuse_unk": [rep("/model/byte_fallback", False), rep("/model/fuse_unk", False)],
        "partial_bytes": [{"op": "remove", "path": f"/model/vocab/<0x{b:02X}>"}
                          for b in (0x95, 0xEC, 0xF0, 0x00)],
        "prepend": [rep("/normalizer", {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SP}, sp_replace]})],
        "no_normalizer": [rep("/normalizer", None)],  # the Split on " " now does split
        "split_isolated": [rep("/pre_tokenizer", split(SP, "Isolated"))],
        "split_previous": [rep("/pre_tokenizer", split(SP, "MergedWithPrevious"))],
        "split_next": [rep("/pre_tokenizer", split(SP, "MergedWithNext"))],
        "split_contiguous": [rep("/pre_tokenizer", split(SP, "Contiguous"))],
        "split_sequence": [rep("/pre_tokenizer", {"type": "Sequence", "pretokenizers": [
            split(SP, "MergedWithNext"), split("er", "Removed")]})],
        "ignore_merges": [rep("/model/ignore_merges", True)],
        "no_decoder_added_plain": [rep("/decoder", None), added(4096, "kludge"), added(4097, "klu")],
        "repeated_merge": [{"op": "add", "path": "/model/merges/-", "value": [SP, SP]}],
        "space_inside_token": [{"op": "add", "path": f"/model/vocab/e{SP}", "value": 4096},
                               {"op": "add", "path": "/model/merges/0", "value": ["e", SP]}],
    }


def apply_patch(doc, ops):
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            last = len(node) if last == "-" else int(last)
        if op["op"] == "remove":
            del node[last]
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(last, op["value"])
        else:
            node[last] = op["value"]
    return doc


def variant_cases(tiny: Path, lines: list[str]) -> list[dict]:
    """Per variant: the patch, and ids / decoded text for every line (row 0 of the file)."""
    base = json.loads((tiny / "tokenizer.json").read_text())
    out = []
    for name, ops in variants().items():
        tok = Tokenizer.from_str(json.dumps(apply_patch(json.loads(json.dumps(base)), ops)))
        ids = [tok.encode(line, add_special_tokens=False).ids for line in lines]
        out.append({"name": name, "patch": ops, "ids": ids,
                    "decoded": [tok.decode(i, skip_special_tokens=False) for i in ids]})
    # The "a b" string form of merges gives the same ids as the ["a", "b"] array form.
    strings = json.loads(json.dumps(base))
    strings["model"]["merges"] = [" ".join(m) for m in strings["model"]["merges"]]
    alt = Tokenizer.from_str(json.dumps(strings))
    ref = Tokenizer.from_str(json.dumps(base))
    assert all(alt.encode(t).ids == ref.encode(t).ids for t in lines)
    return out


def chat_cases() -> list[dict]:
    sys_user_asst = [
        {"role": "system", "content": "You are a helpful hacker."},
        {"role": "user", "content": "What is a kludge?"},
        {"role": "assistant", "content": "A clever, inelegant fix."},
        {"role": "user", "content": "Example?"},
        {"role": "assistant", "content": "Duct tape on a server."}]
    return [
        {"name": "system_multi_turn", "messages": sys_user_asst},
        {"name": "thinking", "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>It is 4."},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6", "reasoning": "add again"}]},
        {"name": "trim_whitespace", "messages": [
            {"role": "system", "content": "\x1c\n  be brief \t\u2029"},
            {"role": "user", "content": "\u3000 hi there \u00a0\n"},
            {"role": "assistant", "content": "  hello  \n\n"},
            {"role": "user", "content": "\u200b zero-width space is not whitespace "},
            {"role": "assistant", "content": "\u2003\u205fok\u200b"}]},
        {"name": "developer_role", "messages": [
            {"role": "developer", "content": "Answer in Korean."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "안녕하세요 👋"}]},
        {"name": "generation_prompt", "add_generation_prompt": True, "messages": [
            {"role": "user", "content": "Tell me a joke."}]},
        {"name": "generation_prompt_thinking", "add_generation_prompt": True,
         "enable_thinking": True, "messages": [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": "Why?"}]},
        {"name": "assistant_continuation", "messages": [
            {"role": "user", "content": "Count."},
            {"role": "assistant", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "more"},
            {"role": "model", "content": "three"}]},
        {"name": "empty_and_mid_system", "messages": [
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": ""},
            {"role": "system", "content": "late rule"},
            {"role": "user", "content": "<|turn> is special"},
            {"role": "assistant", "content": "ok <turn|> done  "}]},
    ]


def make_fixtures(text: str, tiny: Path, golden: Path) -> None:
    hf = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(tiny))
    assert type(auto).__name__ == "GemmaTokenizer", type(auto)
    golden.mkdir(parents=True, exist_ok=True)
    enc = []
    for line in fixture_lines(text):
        ids = hf.encode(line, add_special_tokens=False).ids
        assert auto(line)["input_ids"] == ids, f"AutoTokenizer differs (BOS added?) on {line!r}"
        assert hf.encode(line).ids == ids  # the post-processor adds nothing either
        back = hf.decode(ids, skip_special_tokens=False)
        enc.append({"text": line, "ids": ids, "decoded": back})
    variant_lines = [t for t in fixture_lines(text) if len(t) < 200]
    var = variant_cases(tiny, variant_lines)
    dec = [{"ids": ids, "text": hf.decode(ids, skip_special_tokens=False)}
           for ids in decode_cases(hf.get_vocab_size())]
    chats = []
    for case in chat_cases():
        kw = {"add_generation_prompt": case.get("add_generation_prompt", False)}
        if case.get("enable_thinking"):
            kw["enable_thinking"] = True
        rendered = auto.apply_chat_template(case["messages"], tokenize=False, **kw)
        out = auto.apply_chat_template(case["messages"], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True, **kw)
        ids = list(out["input_ids"])
        assert ids == hf.encode(rendered, add_special_tokens=False).ids
        assert ids[0] == 2 and ids[1] != 2, "exactly one <bos>, from the template"
        chats.append({**case, "rendered": rendered, "ids": ids,
                      "assistant_masks": list(out["assistant_masks"])})
    def dump(obj):  # one case per line: diffable, and far shorter than indent=1
        rows = obj if isinstance(obj, list) else [obj]
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        return ("[\n" + body + "\n]\n") if isinstance(obj, list) else body + "\n"
    (golden / "encode.json").write_text(dump(enc))
    (golden / "decode.json").write_text(dump(dec))
    (golden / "chats.json").write_text(dump(chats))
    (golden / "variants.json").write_text(dump([{"lines": variant_lines}] + var))
    (golden / "VERSIONS.json").write_text(dump({
        "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
        "corpus": "Debian jargon-text 4.4.7-4.1, jargon.txt sha256 " + CORPUS_SHA256}))


def check_against(tiny: Path, reference: str) -> None:
    """Asserts that a reference Gemma 4 template (e.g. Google's chat_template.jinja) renders every
    fixture chat exactly like ours; it is read, never copied."""
    auto = AutoTokenizer.from_pretrained(str(tiny))
    ref = Path(reference).read_text()
    for case in chat_cases():
        kw = {"add_generation_prompt": case.get("add_generation_prompt", False),
              "enable_thinking": case.get("enable_thinking", False)}
        ours = auto.apply_chat_template(case["messages"], tokenize=False, **kw)
        theirs = auto.apply_chat_template(case["messages"], tokenize=False, chat_template=ref, **kw)
        assert ours == theirs, (case["name"], ours, theirs)
    print(f"{reference}: renders all {len(chat_cases())} fixture chats identically")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=CORPUS_DEFAULT)
    ap.add_argument("--tiny", default=str(TINY))
    ap.add_argument("--golden", default=str(GOLDEN))
    ap.add_argument("--check-against", metavar="JINJA", help="a Gemma 4 chat_template.jinja to compare")
    args = ap.parse_args()
    text = read_corpus(args.corpus)
    build_tokenizer(text, Path(args.tiny))
    make_fixtures(text, Path(args.tiny), Path(args.golden))
    if args.check_against:
        check_against(Path(args.tiny), args.check_against)
    print(f"wrote {args.tiny} and {args.golden}")


if __name__ == "__main__":
    main()
