"""Test-only fault hooks: break the blend on purpose, to prove the checks catch it.

A check that never fails proves nothing. `CACHEBLEND_TEST_FAULT` (read once, when a
`Blender` is built, i.e. at engine start-up in vLLM's worker) injects one of two
small, realistic bugs into every blend run, so the tests (and `cacheblend verify
--model`) can show that the master check (`blend/exactness.py`) FAILS under
them and passes without them:

* `rope`: the tokens of each sequence's last loaded chunk (the one next to the
  question) are recomputed with their RoPE one position too far (`position + 1`),
  Q and K, at every layer; the chunk's cached K, where it is still read (r < 1),
  is re-rotated one position too far as well. The bug class: an off-by-one in a
  chunk's offset.
* `mask`: one recomputed token per sequence, the first one of the blend (position
  0, the attention sink, when vLLM's prefix cache holds none of the prompt),
  attends with the causal mask of the next position, so it sees one future token,
  at every layer but the last. The bug class: a wrong run or sequence length in
  the selected-token attention.

Where a fault hits matters: the first token of a chunk, or a mid-chunk token,
seeing one future token moves the first answer token's distribution by less than
bf16 rounding does on its own (offline fp32 figures in bench/notes/history.md), so
no check that tolerates bf16 can see those. These two faults are placed
where a bug does visible harm.

Unset or empty: no fault, and the blend runs its normal code (one `None` check per
layer). Never set it in production; nothing else reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

ENV = "CACHEBLEND_TEST_FAULT"
KINDS = ("rope", "mask")


def active() -> str | None:
    """The fault named by the environment, or None; an unknown name raises (a typo in a test
    must not silently test nothing)."""
    name = os.environ.get(ENV, "").strip()
    if not name:
        return None
    if name not in KINDS:
        raise ValueError(f"{ENV}={name!r}: expected one of {KINDS}")
    return name


def last_run(forced: torch.Tensor) -> tuple[int, int] | None:
    """Row range `[lo, hi)` of the last run of unforced (loaded chunk) rows, or None."""
    free = (~forced).nonzero().flatten().tolist()
    if not free:
        return None
    lo = free[-1]
    while lo > 0 and not bool(forced[lo - 1]):
        lo -= 1
    return lo, free[-1] + 1


def fault_rows(kind: str, spans: Sequence[tuple[int, int] | None],
               forced: Sequence[torch.Tensor]) -> torch.Tensor:
    """[sum(len(f))] int64 (host): 1 on the rows the fault hits, 0 elsewhere.

    `rope`: the rows of `spans[b]` (the sequence's last loaded chunk, which the vLLM
    worker passes as `BlendSeq.fault_span`), or without it the last run of unforced rows.
    `mask`: row 0 of each sequence, the first token the blend recomputes (position 0,
    the attention sink, when vLLM's prefix cache holds none of the prompt).
    """
    out = []
    for span, f in zip(spans, forced):
        rows = torch.zeros(len(f), dtype=torch.long)
        if kind == "mask":
            rows[0] = 1
        else:
            span = span or last_run(f)
            if span is not None:
                rows[span[0]:span[1]] = 1
        out.append(rows)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
