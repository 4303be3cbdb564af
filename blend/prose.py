"""Real English prose that ships with Python (`pydoc_data.topics`, the language reference).

The built-in prompts of `cacheblend verify` and the demo come from here, and so do the
benchmarks' (`bench.common`) and the notebooks': one definition of how the text is cut.
"""

from __future__ import annotations

import random

# Questions about a prompt of `passages` (`cacheblend verify` asks these).
QUESTIONS = ["What is the first passage about?", "Summarize the second passage in one sentence.",
             "Which Python statement is described last?", "Name one keyword mentioned above.",
             "What does the third passage explain?"]


def topics() -> dict[str, str]:
    """Every topic of the language reference, by name."""
    from pydoc_data.topics import topics as t

    return t


def passages(n: int, size: int = 700) -> list[str]:
    """`n` passages of about `size` characters, cut at a word, topics in name order."""
    t = topics()
    out = []
    for k in sorted(t):
        text = " ".join(t[k].split())
        if len(text) >= size:
            cut = text[:size]
            out.append(cut[: cut.rfind(" ")])
        if len(out) == n:
            break
    return out


def prose_prompts(n: int, seed: int = 0) -> list[tuple[list[str], str]]:
    """n prompts of 4 passages (~120 words each) from Python's language reference + a question."""
    t = topics()
    names = sorted(k for k, v in t.items() if len(v.split()) > 150)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pick = rng.sample(names, 4)
        texts = [" ".join(t[k].split()[:120]) for k in pick]
        target = rng.randrange(4)
        q = f"What does the document about '{pick[target]}' explain? Summarize it in two sentences."
        out.append((texts, q))
    return out
