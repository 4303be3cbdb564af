"""Test-only fault hooks: break the blend on purpose, to prove the checks catch it.

A check that never fails proves nothing. `CACHEBLEND_TEST_FAULT` (read once, when a
`Blender` is built, i.e. at engine start-up in vLLM's worker) injects one of two
small, realistic bugs into every blend run, so the tests (and `cacheblend verify
--model`) can show that the master check (`blend/master_check.py`) FAILS under
them and passes without them:

* `rope`: the tokens of each sequence's first loaded chunk are recomputed with their
  RoPE one position too far (`position + 1`), Q and K, at every layer; the
  chunk's cached K, where it is still read (r < 1), is re-rotated one position
  too far as well. The bug class: an off-by-one in a chunk's offset.
* `mask`: one recomputed token per sequence (the middle token of its first loaded
  chunk) attends with the causal mask of the next position, so it sees one
  future token, at every layer but the last. The bug class: a wrong run or
  sequence length in the selected-token attention.

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


def first_chunk(forced: torch.Tensor) -> tuple[int, int] | None:
    """Row range `[lo, hi)` of the first run of unforced (loaded chunk) rows, or None."""
    free = (~forced).nonzero().flatten().tolist()
    if not free:
        return None
    hi = free[0]
    while hi < len(forced) and not bool(forced[hi]):
        hi += 1
    return free[0], hi


def fault_rows(kind: str, forced: Sequence[torch.Tensor]) -> torch.Tensor:
    """[sum(len(f))] int64 (host): 1 on the rows the fault hits, per sequence's forced mask."""
    out = []
    for f in forced:
        rows = torch.zeros(len(f), dtype=torch.long)
        span = first_chunk(f)
        if span is not None:
            lo, hi = span
            if kind == "rope":
                rows[lo:hi] = 1
            else:
                rows[(lo + hi) // 2] = 1
        out.append(rows)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
