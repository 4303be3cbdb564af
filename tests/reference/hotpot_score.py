"""HotpotQA's official answer scoring (`hotpot_evaluate_v1.py`), written out from its
definition: SQuAD's normalisation and token F1, except that when either side normalises to
yes, no or noanswer and the two differ, EM and F1 are 0. Shares no code with `bench/hotpot.py`.
"""

from __future__ import annotations

from reference.squad_score import exact_match, f1_score, normalize_answer

_LABELS = {"yes", "no", "noanswer"}


def hotpot_f1(prediction: str, ground_truth: str) -> float:
    p, g = normalize_answer(prediction), normalize_answer(ground_truth)
    if (p in _LABELS or g in _LABELS) and p != g:
        return 0.0
    return f1_score(prediction, ground_truth)


def hotpot_em(prediction: str, ground_truth: str) -> float:
    return exact_match(prediction, ground_truth)
