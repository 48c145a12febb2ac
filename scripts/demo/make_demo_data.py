"""Builds the demo's data from the Jargon File (public domain; Debian package jargon-text).

  python3 scripts/demo/make_demo_data.py JARGON_TXT_GZ OUT_DIR

Writes OUT_DIR/pretrain.jsonl ({"text": ...}: every entry as "term: definition", used to
train the tiny demo model from scratch) and data/demo/heal.jsonl (chat records: a question
about a term and its first definition paragraph as the model's answer; the heal demo's
dataset, committed). Standard library only; deterministic.
"""
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

ENTRY = re.compile(r"^   :(.+?):\s*(.*)$")


def entries(text: str):
    """Yields (term, [paragraphs]) from the glossary part of jargon.txt."""
    term, paras, cur = None, [], []
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m:
            if term and cur:
                paras.append(" ".join(cur))
            if term and paras:
                yield term, paras
            term, paras, cur = m.group(1).strip(), [], []
            continue
        if term is None:
            continue
        s = line.strip()
        if not s:
            if cur:
                paras.append(" ".join(cur))
                cur = []
        else:
            cur.append(s)
    if term and cur:
        paras.append(" ".join(cur))
    if term and paras:
        yield term, paras


def clean(p: str) -> str:
    p = re.sub(r"\{([^}]*)\}", r"\1", p)  # cross-reference braces
    return re.sub(r"\s+", " ", p).strip()


def main():
    src, out_dir = sys.argv[1], Path(sys.argv[2])
    text = gzip.open(src, "rt", encoding="utf-8").read()
    out_dir.mkdir(parents=True, exist_ok=True)
    pretrain, heal = [], []
    for term, paras in entries(text):
        body = [clean(p) for p in paras if len(clean(p)) > 0]
        if not body:
            continue
        pretrain.append({"text": f"{term}: " + " ".join(body)[:1500]})
        answer = body[0]
        if 40 <= len(answer) <= 600:
            heal.append({"messages": [
                {"role": "user", "content": f"What does \u201c{term}\u201d mean in hacker jargon?"},
                {"role": "assistant", "content": answer}]})
    # A stable, content-keyed order (and subset) independent of the file's alphabetical order.
    key = lambda r: hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()  # noqa: E731
    pretrain.sort(key=key)
    heal.sort(key=key)
    heal = heal[:1200]
    with open(out_dir / "pretrain.jsonl", "w", encoding="utf-8") as f:
        for r in pretrain:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    repo = Path(__file__).resolve().parents[2]
    with open(repo / "data" / "demo" / "heal.jsonl", "w", encoding="utf-8") as f:
        for r in heal:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"pretrain: {len(pretrain)} entries; heal: {len(heal)} chats")


if __name__ == "__main__":
    main()
