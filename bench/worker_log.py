"""What each blended bench run did, read from the engines' log: tokens recomputed, chunks
found or computed, fetch and host time per run.

The GPU bench's timed engines run out of process (vLLM's engine core), so the worker's
counters cannot be read back; each blend logs one DEBUG line (`BLEND_LINE` in
`blend/connector/worker.py`), and the bench writes a marker `[bench] LABEL run I VARIANT`
before each call. This pairs them, so every row (not only the traced ones) says what its
runs recomputed: a row slower than its shape predicts shows whether it found its chunks.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from blend.connector.worker import BLEND_LINE

FIELDS = ("requests", "tokens", "recomputed", "found", "chunks", "computed", "fetch_ms",
          "host_ms")
MARK = re.compile(r"\[bench\] (?P<label>.+) run (?P<run>\d+) (?P<variant>\S+)$")


def marker(label: str, run: int, variant: str) -> str:
    """The log line the bench writes before a run's call; `MARK` reads it back."""
    return f"[bench] {label} run {run} {variant}\n"


def _line_regex(fmt: str) -> re.Pattern:
    parts = re.split(r"(%d|%\.1f)", fmt)
    out = "".join(r"(\d+)" if p == "%d" else r"([\d.]+)" if p == "%.1f" else re.escape(p)
                  for p in parts)
    return re.compile(out)


BLEND = _line_regex(BLEND_LINE)


def parse(lines) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """{(label, variant): {run: totals of that run's blend lines}}; lines before any marker
    (start-up, precompute) are not runs and are left out."""
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    cur = None
    for line in lines:
        m = MARK.search(line.rstrip("\n"))
        if m:
            cur = (m["label"], m["variant"]), int(m["run"])
            continue
        b = BLEND.search(line)
        if b is None or cur is None:
            continue
        (key, run) = cur
        tot = out.setdefault(key, {}).setdefault(run, dict.fromkeys(FIELDS, 0.0))
        for name, val in zip(FIELDS, b.groups()):
            tot[name] += float(val)
        tot["lines"] = tot.get("lines", 0) + 1
    return out


def row_summary(runs: dict[int, dict[str, float]], warmup: int) -> dict | None:
    """Medians over the kept runs (after `warmup`) of a row's per-run totals."""
    kept = [v for i, v in sorted(runs.items()) if i >= warmup]
    if not kept:
        return None
    out = {k: round(statistics.median(v[k] for v in kept), 1) for k in FIELDS if k != "requests"}
    out["runs"] = len(kept)
    out["blend_lines_per_run"] = max(v.get("lines", 0) for v in kept)
    return out


def summaries(path: str | Path, warmup: int) -> dict[tuple[str, str], dict]:
    with open(path, errors="replace") as f:
        parsed = parse(f)
    return {k: s for k, runs in parsed.items() if (s := row_summary(runs, warmup)) is not None}
