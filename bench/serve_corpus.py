"""A corpus of real English documents for the serving benchmark (`bench.serve_rag`).

The serving bench needs thousands of distinct documents of a few hundred tokens, offline. Python
ships its own prose: `pydoc_data.topics` (the language reference) and the docstrings of the
standard library; where those run out (2,000 documents of ~500 tokens is ~5 MB of text), the
docstrings of the installed packages follow. Docstrings are read with `ast` from the source
files, never imported (importing the whole stdlib has side effects: `antigravity`, `this`, GUI
toolkits). Paragraphs that look like code or markup are dropped, the rest deduplicated and packed
into documents whose length, counted with the model's own tokenizer, lies in [lo, hi].

Deterministic given the seed and the Python installation (the GPU machine's 3.12 stdlib gives a
different but equally deterministic corpus). `load_corpus` caches the result as JSON.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "testing", "__pycache__", "site-packages",
              "dist-packages"}
_WORD = re.compile(r"[A-Za-z]{2,}")


def _prose(par: str) -> str | None:
    """One paragraph as a single line, or None when it is code, markup or too short."""
    lines = [ln.strip() for ln in par.strip().splitlines()]
    if not lines or any(ln.startswith((">>>", "...", "..", "$ ", "#", "|", "+-", "==", "--"))
                        for ln in lines):
        return None
    text = " ".join(ln for ln in lines if ln)
    words = text.split()
    if len(words) < 8 or len(_WORD.findall(text)) < 0.7 * len(words):
        return None
    return text


def _docstring_pars(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            yield from re.split(r"\n\s*\n", doc)


def _py_files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*.py")):
        if not SKIP_PARTS.intersection(p.relative_to(root).parts[:-1]):
            yield p


def _site_roots() -> list[Path]:
    roots = {Path(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return sorted(r for r in roots if r.is_dir())


def paragraphs() -> Iterator[tuple[str, str]]:
    """(source, paragraph) of real English text: pydoc topics, stdlib docstrings, then
    installed packages' docstrings; each distinct paragraph once, in a fixed order."""
    from bench.common import topics

    t = topics()
    seen: set[str] = set()

    def fresh(src: str, pars) -> Iterator[tuple[str, str]]:
        for par in pars:
            text = _prose(par)
            if text and text not in seen:
                seen.add(text)
                yield src, text

    for name in sorted(t):
        yield from fresh(f"pydoc:{name}", re.split(r"\n\s*\n", t[name]))
    for root in [Path(sysconfig.get_paths()["stdlib"])] + _site_roots():
        for path in _py_files(root):
            yield from fresh(str(path.relative_to(root)), _docstring_pars(path))


def _split_long(text: str, max_words: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]


def build_corpus(tok, n_docs: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """`n_docs` documents of lo..hi tokens (by `tok`), shuffled by `seed`.

    Consecutive paragraphs are packed until a random target in [lo, hi] is reached; every
    document is re-counted whole and kept only inside the bounds. Raises if the text runs out.
    """
    rng = random.Random(seed)
    docs: list[dict] = []
    cur: list[str] = []
    cur_n, target, src0 = 0, rng.randint(lo, hi), ""
    batch: list[tuple[str, str]] = []

    def flush_batch():
        nonlocal cur, cur_n, target, src0
        counts = tok([p for _, p in batch], add_special_tokens=False).input_ids
        for (src, par), ids in zip(batch, counts):
            if cur_n + len(ids) > hi:  # would overflow: start a new document
                cur, cur_n = [], 0
            if not cur:
                src0 = src
            cur.append(par)
            cur_n += len(ids) + 1
            if cur_n >= target:
                text = "\n\n".join(cur)
                n = len(tok(text, add_special_tokens=False).input_ids)
                if lo <= n <= hi:
                    docs.append({"text": text, "tokens": n, "source": src0})
                cur, cur_n, target = [], 0, rng.randint(lo, hi)
        batch.clear()

    max_words = max(8, hi // 3)  # a paragraph longer than this is cut into word windows
    for src, par in paragraphs():
        batch.extend((src, p) for p in _split_long(par, max_words))
        if len(batch) >= 256:
            flush_batch()
            if len(docs) >= n_docs:
                break
    else:
        flush_batch()
    if len(docs) < n_docs:
        raise RuntimeError(f"the installed Python's text gave {len(docs)} documents of {lo}-{hi} "
                           f"tokens, {n_docs} asked for")
    docs = docs[:n_docs]
    rng.shuffle(docs)
    return docs


def load_corpus(tok, n_docs: int, lo: int, hi: int, seed: int, cache_dir: Path) -> list[dict]:
    """`build_corpus`, cached in `cache_dir` under a key of its arguments and the tokenizer."""
    key = json.dumps([n_docs, lo, hi, seed, type(tok).__name__, len(tok),
                      getattr(tok, "name_or_path", ""), sys.version.split()[0]])
    path = Path(cache_dir) / f"corpus_{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.exists():
        return json.loads(path.read_text())["docs"]
    docs = build_corpus(tok, n_docs, lo, hi, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "docs": docs}))
    tmp.replace(path)
    return docs


if __name__ == "__main__":  # quick look: python -m bench.serve_corpus MODEL_DIR N LO HI
    from transformers import AutoTokenizer

    _tok = AutoTokenizer.from_pretrained(sys.argv[1])
    _docs = build_corpus(_tok, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    _n = [d["tokens"] for d in _docs]
    print(len(_docs), "docs; tokens min/mean/max", min(_n), sum(_n) // len(_n), max(_n))
    print(_docs[0]["source"], "::", _docs[0]["text"][:400])
