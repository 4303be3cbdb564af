"""The GPU bench's per-run blend lines: markers pair with the worker's own DEBUG format."""

from __future__ import annotations

import logging

from bench import worker_log
from blend.connector.worker import BLEND_LINE
from blend.log import get_logger

FMT = logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%H:%M:%S")  # blend/log.py's


def _line(tier: str, *vals) -> str:
    """A line as the bench's log holds it: engine tag, the blend logger's format."""
    rec = logging.LogRecord("blend.connector", logging.DEBUG, __file__, 0,
                            "[Blend.Connector] " + BLEND_LINE, vals, None)
    return f"[{tier}] {FMT.format(rec)}\n"


def test_runs_pair_with_markers_and_warmups_are_left_out():
    lines = [
        _line("host", 1, 900, 900, 0, 2, 2, 0.0, 30.0),  # precompute: before any marker
        "[bench] 16x512 run 0 plain\n",
        "[bench] 16x512 run 0 host:deviation\n",
        _line("host", 1, 8286, 2000, 16, 16, 0, 1.5, 9.0),  # warm-up run
        "[bench] 16x512 run 1 host:deviation\n",
        _line("host", 1, 8286, 1300, 16, 16, 0, 1.0, 5.0),
        "[host] INFO 12:00:00 unrelated line\n",
        "[bench] 16x512 run 2 host:deviation\n",
        _line("host", 1, 4000, 700, 8, 8, 0, 0.5, 2.0),  # one request in two blend runs
        _line("host", 1, 4286, 800, 8, 8, 1, 0.5, 4.0),
        "[bench] miss 1/16 run 2 gpu:deviation\n",
        _line("gpu", 1, 8286, 1800, 15, 16, 1, 0.2, 7.0),
    ]
    parsed = worker_log.parse(lines)
    assert set(parsed) == {("16x512", "host:deviation"), ("miss 1/16", "gpu:deviation")}
    assert parsed[("16x512", "host:deviation")][2]["recomputed"] == 1500
    assert parsed[("16x512", "host:deviation")][2]["lines"] == 2
    s = worker_log.row_summary(parsed[("16x512", "host:deviation")], warmup=1)
    assert s["runs"] == 2 and s["blend_lines_per_run"] == 2
    assert s["recomputed"] == 1400.0 and s["found"] == 16.0 and s["computed"] == 0.5
    assert s["host_ms"] == 5.5 and s["tokens"] == 8286.0
    assert worker_log.row_summary(parsed[("16x512", "host:deviation")], warmup=3) is None


def test_the_worker_logger_writes_what_the_parser_reads(tmp_path, monkeypatch):
    """Through the project's own logger and handler (the format a bench engine writes)."""
    path = tmp_path / "workers.log"
    log = get_logger("Connector")
    handler = logging.FileHandler(path)
    handler.setFormatter(FMT)
    base = logging.getLogger("blend")
    monkeypatch.setattr(base, "level", logging.DEBUG)
    base.addHandler(handler)
    try:
        with open(path, "a") as f:
            f.write(worker_log.marker("32x1000", 4, "gpu:cheap"))
        log.debug(BLEND_LINE, 1, 32088, 1411, 30, 32, 2, 3.25, 12.0)
    finally:
        base.removeHandler(handler)
        handler.close()
    got = worker_log.summaries(path, warmup=2)
    assert got == {("32x1000", "gpu:cheap"): {
        "tokens": 32088.0, "recomputed": 1411.0, "found": 30.0, "chunks": 32.0, "computed": 2.0,
        "fetch_ms": 3.2, "host_ms": 12.0, "runs": 1, "blend_lines_per_run": 1}}
