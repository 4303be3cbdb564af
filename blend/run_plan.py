"""The host-side plan of one `Blender.run`: every layer's row counts, from host metadata alone.

A blend narrows its active rows (the tokens it recomputes) at each check layer,
drops the question's probe rows after the last one, and runs the last layer for
the output rows only. All of those sizes follow from each sequence's length,
forced count, question and the config, so they are worked out here, once, before
the first layer: the layer loop only indexes device tensors with them and never
syncs the device to learn a size. Pure integer arithmetic: nothing here touches
a device.

A *phase* is a stretch of layers with the same active rows: phase 0 starts at
layer 0 (after the cheap probe pass, if any), phase i follows the i-th check
layer. A `cu` is a cumulative row count per sequence with a leading 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blend.config import BlendConfig, num_recompute


@dataclass(frozen=True)
class RunPlan:
    lens: tuple[int, ...]  # tokens computed per sequence: the run's input rows
    seq_lens: tuple[int, ...]  # keys per sequence in the cache (its end position)
    token_cu: tuple[int, ...]  # cu of the input rows
    outputs: tuple[int, ...]  # each sequence's last rows that get logits
    probes: tuple[int, ...]  # question rows before the outputs that only steer selection
    question: tuple[int, ...]  # outputs + probes: the forced tail that query selection reads
    question_cu: tuple[int, ...]
    output_cu: tuple[int, ...]
    cheap: bool  # a probe pass of the question picks the recomputed rows before layer 0
    probe_rows: tuple[int, ...]  # cheap: the question's rows among the input rows
    cheap_takes: tuple[int, ...]  # cheap: rows each sequence keeps after the probe pass
    takes: dict[int, tuple[int, ...]]  # check layer -> rows each sequence keeps (forced first)
    query_rows: dict[int, tuple[int, ...]]  # check layer -> the question's rows among its rows
    phase_cu: tuple[tuple[int, ...], ...]  # per phase: cu of the active rows
    context_rows: tuple[tuple[int, ...], ...]  # per phase: active rows per sequence, question excluded
    dense: tuple[bool, ...]  # per phase: every input row is active (each query set is a prefill)
    rows_without_probes: tuple[int, ...] | None  # the rows kept when the probes leave
    output_rows: tuple[int, ...]  # the output rows among the last phase's rows
    # Row lists the run indexes with, in the order it first uses them (the CUDA preload).
    preload_rows: tuple[tuple[int, ...], ...]

    @property
    def last_check(self) -> int | None:
        """The check layer after which the probes leave (None without check layers)."""
        return max(self.takes) if self.takes else None

    @property
    def has_question(self) -> bool:
        return any(self.question)


def plan_run(
    config: BlendConfig,
    lens: Sequence[int],
    seq_lens: Sequence[int],
    forced: Sequence[torch.Tensor | None],
    num_outputs: Sequence[int],
    num_probes: Sequence[int],
    *,
    blend: bool,
) -> RunPlan:
    """The plan of a run over sequences of `lens` input tokens ending at `seq_lens` keys.

    `forced[b]` is sequence b's host bool mask of always-recomputed rows, or None;
    masks and probes count only in a blend. Its last `num_outputs[b]` rows get
    logits; in a blend the `num_probes[b]` rows before them are the question as
    probes (forced up to the last check layer, then dropped).
    """
    lens = tuple(int(n) for n in lens)
    outputs = tuple(min(o, n) for o, n in zip(num_outputs, lens))
    probes = tuple(min(p, n - o) if blend else 0 for p, n, o in zip(num_probes, lens, outputs))
    question = tuple(o + p for o, p in zip(outputs, probes))
    num_forced = [q + (0 if f is None or not blend else int(f[:n - q].sum()))
                  for f, n, q in zip(forced, lens, question)]
    num_cached = [n - f for n, f in zip(lens, num_forced)]

    def keeps(ratio: float) -> tuple[int, ...]:
        return tuple(f + num_recompute(ratio, c) for f, c in zip(num_forced, num_cached))

    token_cu = cumsum(lens)
    cheap = blend and config.selection == "cheap" and any(question)
    checks = dict(zip(config.check_layers, config.ratios())) if blend and not cheap else {}
    cheap_takes = keeps(config.recomp_ratio)
    preload_rows: list[tuple[int, ...]] = []
    rows_without_probes = None
    start_cu = token_cu
    if cheap:
        preload_rows.append(tail_rows(token_cu, question))
        start_cu = cumsum(min(t, n) for t, n in zip(cheap_takes, lens))
        if any(probes):
            rows_without_probes = head_rows(start_cu, probes)
            start_cu = cumsum(n - p for n, p in zip(sizes(start_cu), probes))
    takes, query_rows, phase_cu = {}, {}, [start_cu]
    for layer in sorted(checks):
        cu = phase_cu[-1]
        if config.selection in ("query", "hybrid") and any(question):
            query_rows[layer] = tail_rows(cu, question)
            preload_rows.append(query_rows[layer])
        takes[layer] = keeps(checks[layer])
        cu = cumsum(min(t, n) for t, n in zip(takes[layer], sizes(cu)))
        if layer == max(checks) and any(probes):  # probes: no use past the last check
            rows_without_probes = head_rows(cu, probes)
            cu = cumsum(n - p for n, p in zip(sizes(cu), probes))
        phase_cu.append(cu)
    if rows_without_probes is not None:
        preload_rows.append(rows_without_probes)
    last = len(phase_cu) - 1  # the probes have left by the last phase
    context_rows = tuple(tuple(n - q for n, q in zip(sizes(cu), outputs if p == last else question))
                         for p, cu in enumerate(phase_cu))
    return RunPlan(
        lens=lens, seq_lens=tuple(int(n) for n in seq_lens), token_cu=token_cu, outputs=outputs,
        probes=probes, question=question, question_cu=cumsum(question), output_cu=cumsum(outputs),
        cheap=cheap, probe_rows=tail_rows(token_cu, question) if cheap else (),
        cheap_takes=cheap_takes, takes=takes, query_rows=query_rows, phase_cu=tuple(phase_cu),
        context_rows=context_rows, dense=tuple(cu == token_cu for cu in phase_cu),
        rows_without_probes=rows_without_probes, output_rows=tail_rows(phase_cu[-1], outputs),
        preload_rows=tuple(preload_rows))


def cumsum(counts) -> tuple[int, ...]:
    """`(0, c0, c0+c1, ...)`: row offsets of consecutive sequences."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return tuple(out)


def sizes(cu: Sequence[int]) -> list[int]:
    """Rows per sequence of a `cu`."""
    return [cu[b + 1] - cu[b] for b in range(len(cu) - 1)]


def tail_rows(cu: Sequence[int], tail: Sequence[int]) -> tuple[int, ...]:
    """Row indexes of the last `tail[b]` rows of each sequence (the question)."""
    return tuple(i for b, t in enumerate(tail) for i in range(cu[b + 1] - t, cu[b + 1]))


def head_rows(cu: Sequence[int], tail: Sequence[int]) -> tuple[int, ...]:
    """Row indexes of each sequence without its last `tail[b]` rows (probes dropped)."""
    return tuple(i for b, t in enumerate(tail) for i in range(cu[b], cu[b + 1] - t))
