"""The master check's criterion (`blend/exactness.py`) on synthetic rows: engine-free, fast.

Cases that must pass (identical runs, bf16-sized noise, a flip at a near-tie) and cases
that must fail (a flip at a clear margin, a shifted distribution, too few prompts).
"""

from __future__ import annotations

import math
import random

import pytest

from blend.exactness import (
    KL_MAX,
    KL_MAX_FP32,
    MIN_PROMPTS,
    TIE_NATS,
    Answer,
    first_token_kl,
    judge,
    tolerance,
)

V = 40  # toy vocabulary
K = 20  # top-k kept per row, as SamplingParams(logprobs=20)


def _logits(seed: int) -> list[float]:
    """Logits like a small LM's at an answer token: a few leaders between 16 and 32."""
    rng = random.Random(seed)
    return [24.0 + 4.0 * rng.gauss(0, 1) for _ in range(V)]


def _row(logits: list[float], k: int = K) -> dict[int, float]:
    z = math.log(sum(math.exp(x) for x in logits))
    top = sorted(range(len(logits)), key=lambda t: -logits[t])[:k]
    return {t: logits[t] - z for t in top}


def _bf16(x: float) -> float:
    """Round to bf16 (8 significant bits)."""
    if x == 0:
        return 0.0
    e = math.floor(math.log2(abs(x)))
    step = 2.0 ** (e - 7)
    return round(x / step) * step


def _answer(logit_rows: list[list[float]]) -> Answer:
    rows = [_row(r) for r in logit_rows]
    return Answer([max(r, key=r.get) for r in rows], rows)


def _prompt(seed: int, n: int = 8) -> list[list[float]]:
    return [_logits(seed * 100 + i) for i in range(n)]


def _noisy(rows: list[list[float]], seed: int, sigma: float) -> list[list[float]]:
    rng = random.Random(seed)
    return [[_bf16(x + rng.gauss(0, sigma)) for x in r] for r in rows]


def test_identical_runs_pass():
    plain = [_answer(_prompt(s)) for s in range(MIN_PROMPTS)]
    res = judge(plain, plain)
    assert res.passed, res.summary()
    assert res.mean_first_kl == pytest.approx(0.0, abs=1e-12) and res.identical == MIN_PROMPTS
    assert "PASS" in res.summary() and len(res.table().splitlines()) == MIN_PROMPTS + 1


def test_bf16_rounding_noise_passes():
    """Each logit rounded to bf16 after noise of half a bf16 step (0.0625 between 16 and 32):
    what r=1.0 through other kernels looks like. Greedy tokens may only flip at near-ties."""
    prompts = [_prompt(s) for s in range(12)]
    plain = [_answer([[_bf16(x) for x in r] for r in p]) for p in prompts]
    blend = [_answer(_noisy(p, 7 + i, 0.0625)) for i, p in enumerate(prompts)]
    res = judge(plain, blend)
    assert res.mean_first_kl < KL_MAX, res.summary()
    # The same noise in an fp32 engine would be a bug: its tolerance is 2^16 times tighter
    # in steps, so it fails there.
    assert not judge(plain, blend, dtype="float32").passed
    for p in res.prompts:
        assert p.diverged_at is None or p.gap <= 2 * 0.125 + 0.05, res.table()
    assert res.passed, res.summary() + "\n" + res.table()


def test_divergence_at_a_near_tie_passes_and_is_reported():
    rows = _prompt(1)
    leader = max(range(V), key=lambda t: rows[3][t])
    second = sorted(range(V), key=lambda t: -rows[3][t])[1]
    rows[3][second] = rows[3][leader] - 0.2  # plain's top two 0.2 nats apart
    flipped = [list(r) for r in rows]
    flipped[3][second] = rows[3][leader] + 0.01  # the blend's rounding picks the other
    plain = [_answer(rows)] + [_answer(_prompt(s)) for s in range(2, 11)]
    blend = [_answer(flipped)] + plain[1:]
    res = judge(plain, blend)
    assert res.passed, res.summary()
    p0 = res.prompts[0]
    assert p0.diverged_at == 3 and p0.near_tie and p0.gap == pytest.approx(0.2)
    assert res.tie_divergences == 1 and "1 left at a plain near-tie" in res.summary()


def test_divergence_at_a_clear_margin_fails():
    """A flip where plain's top two are 1 nat apart is no rounding: FAIL, with the reason."""
    rows = _prompt(1)
    order = sorted(range(V), key=lambda t: -rows[2][t])
    rows[2][order[1]] = rows[2][order[0]] - 1.0
    bad = [list(r) for r in rows]
    bad[2][order[1]] = rows[2][order[0]] + 0.5
    plain = [_answer(rows)] + [_answer(_prompt(s)) for s in range(2, 11)]
    res = judge(plain, [_answer(bad)] + plain[1:])
    assert not res.passed
    assert res.prompts[0].diverged_at == 2 and not res.prompts[0].near_tie
    assert any("prompt 0 left plain vLLM's tokens at 2" in r for r in res.reasons), res.reasons
    assert "FAIL" in res.summary() and "BUG" in res.table()


def test_token_outside_plain_top_k_fails():
    rows = _prompt(4)
    plain = [_answer(rows)] + [_answer(_prompt(s)) for s in range(5, 14)]
    weird = Answer(list(plain[0].tokens), list(plain[0].rows))
    weird.tokens[1] = 10_000  # not in plain's top-k at all
    res = judge(plain, [weird] + plain[1:])
    assert not res.passed and math.isinf(res.prompts[0].gap)


def test_shifted_first_token_distribution_fails_on_kl():
    """Same greedy tokens, but the first answer token's distribution moved by more than bf16
    noise (0.6 nats of logit noise): the mean KL catches it."""
    prompts = [_prompt(s) for s in range(10)]
    plain = [_answer(p) for p in prompts]
    blend = []
    for i, p in enumerate(prompts):
        moved = _noisy(p, 50 + i, 0.6)
        a = _answer(moved)
        blend.append(Answer(list(plain[i].tokens), a.rows))  # tokens kept equal on purpose
    res = judge(plain, blend)
    assert not res.passed and res.mean_first_kl > KL_MAX, res.summary()
    assert any("mean first-token KL" in r for r in res.reasons)


def test_too_few_prompts_fail():
    plain = [_answer(_prompt(s)) for s in range(3)]
    res = judge(plain, plain)
    assert not res.passed and f"at least {MIN_PROMPTS}" in res.reasons[0]
    assert judge(plain, plain, min_prompts=3).passed


def test_early_stop_on_one_side_is_a_divergence():
    rows = _prompt(9)
    plain = [_answer(rows)] + [_answer(_prompt(s)) for s in range(10, 19)]
    short = Answer(plain[0].tokens[:5], plain[0].rows[:5])
    res = judge(plain, [short] + plain[1:])
    assert not res.passed and res.prompts[0].diverged_at == 5


def test_first_token_kl_handles_missing_tokens():
    """KL over plain's top-k, both renormalized there; a token the blend's top-k lacks gets
    the blend's smallest returned logprob (an underestimate of its term, never invented)."""
    p = {1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.1)}
    assert first_token_kl(p, p) == 0.0
    q = {1: math.log(0.6), 2: math.log(0.39)}  # 3 missing: floor log(0.39)
    kl = first_token_kl(p, q)
    z = 0.6 + 0.39 + 0.39
    want = sum(pp * math.log(pp / qq) for pp, qq in ((0.6, 0.6 / z), (0.3, 0.39 / z),
                                                     (0.1, 0.39 / z)))
    assert kl == pytest.approx(want)
    assert first_token_kl({str(k): v for k, v in p.items()}, q) == pytest.approx(kl)  # JSON keys
    with pytest.raises(ValueError, match="empty"):
        first_token_kl(p, {})


def test_mismatched_inputs_raise():
    a = _answer(_prompt(1))
    with pytest.raises(ValueError, match="plain answers"):
        judge([a], [a, a])
    with pytest.raises(ValueError, match="logprob rows"):
        Answer([1, 2], [{1: 0.0}])


def test_tolerances_are_the_documented_ones():
    assert TIE_NATS == 0.3 and KL_MAX == 0.01 and MIN_PROMPTS == 10
    assert tolerance("bfloat16") == tolerance("torch.float16") == (0.01, 0.3)
    assert tolerance("float32") == tolerance("torch.float32") == (KL_MAX_FP32, 0.01)


def test_fault_hook_rows(monkeypatch):
    """The test-only faults hit what blend/faults.py says: a chunk's rows, or row 0."""
    import torch

    from blend import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.active() is None
    monkeypatch.setenv(faults.ENV, "rope")
    assert faults.active() == "rope"
    monkeypatch.setenv(faults.ENV, "ropes")
    with pytest.raises(ValueError, match="expected one of"):
        faults.active()
    forced = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert faults.fault_rows("rope", [(3, 5)], [forced]).tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert faults.fault_rows("rope", [None], [forced]).tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert faults.fault_rows("mask", [None, None], [forced, forced[:3]]).tolist() == \
        [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
