"""The master check (exactness at r=1.0): is a recomp_ratio=1.0 blend plain vLLM, within what bf16 allows?

At r=1.0 the blend recomputes every context token, so it must give plain vLLM's
answer. It cannot give it bit for bit in bf16: the blend groups the same
arithmetic differently (other kernels, other batch shapes), and vLLM is not even
bit-stable against itself across batch compositions. A check that asks for
equal tokens and per-token logprob tolerances fails on honest near-ties (a prompt
can leave plain vLLM after a few tokens at a tie); a check loose enough to
never do that lets real bugs through. This module judges a set of prompts (at
least `MIN_PROMPTS`) on two things that bf16 noise leaves small and real bugs
do not:

1. **Mean first-answer-token KL(plain || blend)** over the prompts, from vLLM's
   top-k logprobs (`SamplingParams(logprobs=k)`), at most `KL_MAX`.
2. **Greedy agreement**: each prompt's greedy tokens equal plain vLLM's, or first
   differ at a position where plain vLLM's own top two are within `TIE_NATS`
   (a near-tie that bf16 rounding can flip). Later tokens are not compared: after
   a divergence the two runs continue different texts.

Engine-free and pure: the inputs are token ids and `{token id: logprob}` rows, so
the same code judges the CPU tests, the GPU tests and `cacheblend verify --model`.

Tolerances, from the engine's arithmetic (`tolerance(dtype)`). For small logit
perturbations delta, KL(p || q) is about 1/2 Var_p(delta).

* bf16 (and fp16, held to bf16's bounds): bf16 keeps 8 significant bits, so a logit
  between 16 and 32 (where a small LM's top logits sit) moves in steps of
  2^4 * 2^-7 = 0.125; two runs of the same math rounded differently leave each
  logit off by up to about a step.
  - `TIE_NATS = 0.3`: two such steps plus rounding. A top-two gap that small can
    flip under rounding alone; a larger one cannot, so a flip there is a bug.
  - `KL_MAX = 0.01`: a typical per-logit disagreement of 0.14 nats (1.1 bf16
    steps), on the mean over prompts; a few times what r=1.0 gives on the GPU
    (bench/notes/history.md).
* fp32: a logit between 16 and 32 moves in steps of 2^-19 (2e-6), and r=1.0 through
  the connector measured KL ~0 with identical tokens on vLLM CPU. `KL_MAX_FP32 =
  1e-3` (0.045 nats per logit, thousands of fp32 steps) and `TIE_NATS_FP32 = 0.01`.

What bf16 costs: a bug that moves the answer distribution by less than bf16 rounding
does cannot be told from rounding: a mask fault on the attention sink or on one
chunk-middle token moves the first answer token by less than that (offline fp32
figures in bench/notes/history.md). fp32 runs (the CPU tests) catch such faults; a
bf16 run catches those above KL_MAX (`blend/faults.py`, tests/test_verify_model.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TIE_NATS = 0.3
KL_MAX = 0.01
TIE_NATS_FP32 = 0.01
KL_MAX_FP32 = 1e-3
MIN_PROMPTS = 10


def tolerance(dtype: str) -> tuple[float, float]:
    """(kl_max, tie_nats) for an engine computing in `dtype` ("bfloat16", "float32", ...,
    or a torch dtype's str); anything but fp32 gets bf16's bounds."""
    name = str(dtype).replace("torch.", "")
    return (KL_MAX_FP32, TIE_NATS_FP32) if name in ("float32", "float") else (KL_MAX, TIE_NATS)

Row = Mapping  # {token id (int or str): logprob}: one generated position's top-k


def _row(r: Row) -> dict[int, float]:
    return {int(t): float(lp) for t, lp in r.items() if int(t) >= 0}


def first_token_kl(plain: Row, blend: Row) -> float:
    """KL(plain || blend) of one position, from the two runs' top-k logprobs.

    Both distributions are restricted to plain's top-k tokens and renormalized
    there, so the figure is a true KL (>= 0) of two distributions on one support
    and needs no guess at the tails (plain's top-20 holds nearly all the mass of a
    first answer token). A plain top-k token missing from the blend's top-k gets
    the blend's smallest returned logprob: the most it can have, so that term is
    underestimated, never invented. At r=1.0 such tokens sit at the bottom of the
    list, where their weight is tiny; a bug that reorders the top shows up in the
    tokens both lists hold.
    """
    p, q = _row(plain), _row(blend)
    if not p or not q:
        raise ValueError("first_token_kl: empty logprob row (was SamplingParams(logprobs=k) set?)")
    floor = min(q.values())
    lp = {t: v for t, v in p.items()}
    lq = {t: q.get(t, floor) for t in p}
    zp = math.log(sum(math.exp(v) for v in lp.values()))
    zq = math.log(sum(math.exp(v) for v in lq.values()))
    return max(0.0, sum(math.exp(lp[t] - zp) * ((lp[t] - zp) - (lq[t] - zq)) for t in lp))


@dataclass
class Answer:
    """One run of one prompt: greedy token ids and the top-k row at each generated position."""

    tokens: list[int]
    rows: list[Row]

    def __post_init__(self) -> None:
        if not self.tokens or len(self.rows) < len(self.tokens):
            raise ValueError(f"Answer: {len(self.tokens)} tokens but {len(self.rows)} logprob "
                             "rows (one row per generated token is needed)")


@dataclass
class PromptResult:
    """One prompt's figures."""

    first_kl: float
    diverged_at: int | None  # first position where the tokens differ; None: identical
    gap: float | None  # plain's logprob(own token) - logprob(blend's token) there (inf: not in top-k)
    near_tie: bool | None  # gap <= tie_nats; None when identical
    compared: int  # positions compared

    @property
    def ok(self) -> bool:
        return self.diverged_at is None or bool(self.near_tie)


@dataclass
class CheckResult:
    """The verdict over a set of prompts, with the figures that justify it."""

    prompts: list[PromptResult]
    mean_first_kl: float
    kl_max: float
    tie_nats: float
    passed: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def identical(self) -> int:
        return sum(p.diverged_at is None for p in self.prompts)

    @property
    def tie_divergences(self) -> int:
        return sum(p.diverged_at is not None and bool(p.near_tie) for p in self.prompts)

    @property
    def bad_divergences(self) -> int:
        return sum(not p.ok for p in self.prompts)

    def summary(self) -> str:
        """One line: the verdict and the figures."""
        verdict = "PASS" if self.passed else "FAIL"
        line = (f"{verdict}: {len(self.prompts)} prompts, mean first-token KL "
                f"{self.mean_first_kl:.2e} (max {self.kl_max:g}); greedy: {self.identical} "
                f"identical, {self.tie_divergences} left at a plain near-tie "
                f"(<= {self.tie_nats:g} nats), {self.bad_divergences} elsewhere")
        return line + ("" if self.passed else "; " + "; ".join(self.reasons))

    def table(self) -> str:
        """One row per prompt."""
        out = [f"{'prompt':>6} {'first KL':>10} {'tokens':>7} {'diverged at':>11} "
               f"{'plain gap':>9}  verdict"]
        for i, p in enumerate(self.prompts):
            at = "-" if p.diverged_at is None else str(p.diverged_at)
            gap = "-" if p.gap is None else ("not top-k" if math.isinf(p.gap) else f"{p.gap:.3f}")
            why = "same" if p.diverged_at is None else ("near-tie" if p.near_tie else "BUG")
            out.append(f"{i:>6} {p.first_kl:>10.2e} {p.compared:>7} {at:>11} {gap:>9}  {why}")
        return "\n".join(out)


def _divergence(plain: Answer, blend: Answer) -> tuple[int | None, int]:
    """(first differing position or None, positions compared)."""
    n = min(len(plain.tokens), len(blend.tokens))
    for i in range(n):
        if plain.tokens[i] != blend.tokens[i]:
            return i, i + 1
    if len(plain.tokens) != len(blend.tokens):  # one stopped (EOS) where the other went on
        return n, n
    return None, n


def judge_prompt(plain: Answer, blend: Answer, tie_nats: float = TIE_NATS) -> PromptResult:
    """First-token KL and where (and how) the greedy tokens first differ."""
    at, compared = _divergence(plain, blend)
    gap = near = None
    if at is not None:
        if at < len(plain.tokens) and at < len(blend.tokens):
            row = _row(plain.rows[at])
            own, other = plain.tokens[at], blend.tokens[at]
            gap = row[own] - row[other] if own in row and other in row else math.inf
        else:
            gap = math.inf  # a stop on one side only: not a rounding flip between two tokens
        near = gap <= tie_nats
    return PromptResult(first_token_kl(plain.rows[0], blend.rows[0]), at, gap, near, compared)


def judge(plain: Sequence[Answer], blend: Sequence[Answer], *, dtype: str = "bfloat16",
          kl_max: float | None = None, tie_nats: float | None = None,
          min_prompts: int = MIN_PROMPTS) -> CheckResult:
    """The master check over prompts `i` (plain[i] vs blend[i]); see the module docstring.
    Tolerances are `tolerance(dtype)`'s unless given."""
    kl_max = tolerance(dtype)[0] if kl_max is None else kl_max
    tie_nats = tolerance(dtype)[1] if tie_nats is None else tie_nats
    if len(plain) != len(blend):
        raise ValueError(f"judge: {len(plain)} plain answers but {len(blend)} blended")
    prompts = [judge_prompt(p, b, tie_nats) for p, b in zip(plain, blend)]
    mean_kl = sum(p.first_kl for p in prompts) / len(prompts) if prompts else math.nan
    reasons = []
    if len(prompts) < min_prompts:
        reasons.append(f"{len(prompts)} prompts judged, at least {min_prompts} needed")
    if not mean_kl <= kl_max:
        reasons.append(f"mean first-token KL {mean_kl:.3e} > {kl_max:g}")
    for i, p in enumerate(prompts):
        if not p.ok:
            gap = "not in plain's top-k" if math.isinf(p.gap) else f"{p.gap:.3f} nats"
            reasons.append(f"prompt {i} left plain vLLM's tokens at {p.diverged_at}, where "
                           f"plain's gap to the blend's token is {gap} (> {tie_nats:g})")
    return CheckResult(prompts, mean_kl, kl_max, tie_nats, not reasons, reasons)


def answer_from_vllm(out) -> Answer:
    """An `Answer` from a vLLM `RequestOutput` generated with `SamplingParams(logprobs=k)`."""
    o = out.outputs[0]
    if o.logprobs is None:
        raise ValueError("answer_from_vllm: no logprobs (set SamplingParams(logprobs=k))")
    rows = [{int(t): lp.logprob for t, lp in r.items() if t >= 0} for r in o.logprobs]
    return Answer(list(o.token_ids), rows)
