"""Per-request blend traces as JSON: what was measured, what was recomputed, how long it took.

A `BlendTrace` (from `blend.blender`) holds tensors for a whole batch; this
module turns it into one small JSON document per request that notebooks, the
CLI and people can read without torch or the model:

    {"version": 1, "req_id": "...", "context": [start, end],
     "chunks": [[start, end, key or null], ...],
     "check_layers": [1, ...],
     "deviation": {"1": [d_start, ..., d_end-1], ...},   # null where not measured
     "selected": [positions recomputed after the last check layer],
     "timings_ms": {"blend": ..., ...},
     "token_layers": ..., "blended_tokens": ..., "probes": ...}   # connector traces

`token_layers / (blended_tokens x num_layers)` is the request's measured compute as a share
of a full prefill of the same tokens (`BlendTrace.token_layers`, per request).

Offline: `trace_from_result(HFBlender.prefill(...))`. Serving: the connector
writes one file per blended request into `kv_connector_extra_config["trace_dir"]`
(`write_request_trace`). `load_trace` reads either back.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACE_VERSION = 1


@dataclass
class Trace:
    """A trace read back from JSON (plain Python lists; NaN where a layer did not measure)."""

    req_id: str
    context: tuple[int, int]
    chunks: list[tuple[int, int, str | None]]
    deviation: dict[int, list[float]]
    selected: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def check_layers(self) -> list[int]:
        return sorted(self.deviation)

    def positions(self) -> list[int]:
        """Token positions the deviation lists are indexed by."""
        return list(range(self.context[0], self.context[1]))

    def recomputed_fraction(self) -> float:
        n = self.context[1] - self.context[0]
        return len(self.selected) / n if n else 0.0


def _clean(xs: Sequence[float]) -> list[float | None]:
    """Strict JSON: NaN (not measured) becomes null."""
    return [None if (x is None or (isinstance(x, float) and math.isnan(x))) else float(x)
            for x in xs]


def make_doc(req_id: str, context: tuple[int, int], deviation: dict[int, Sequence[float]],
             selected: Sequence[int], timings_ms: dict[str, float] | None = None,
             chunks: Sequence[tuple[int, int, str | None]] = (),
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-ready trace document of one request (`extra`: more top-level keys)."""
    return {**(extra or {}),
        "version": TRACE_VERSION,
        "req_id": str(req_id),
        "context": [int(context[0]), int(context[1])],
        "chunks": [[int(s), int(e), k] for s, e, k in chunks],
        "check_layers": sorted(int(k) for k in deviation),
        "deviation": {str(k): _clean(v) for k, v in sorted(deviation.items())},
        "selected": [int(p) for p in selected],
        "timings_ms": {k: round(float(v), 3) for k, v in (timings_ms or {}).items()},
    }


def trace_from_result(result: Any, req_id: str = "offline",
                      keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Trace document of an offline `HFBlender.prefill` result (one sequence)."""
    layout, trace = result.layout, result.trace
    end = layout.context_len
    dev = {layer: trace.deviation_dense(layer, 0, end).tolist() for layer in trace.deviation}
    keys = list(keys) if keys is not None else [None] * len(layout.spans)
    chunks = [(s, e, k) for (s, e), k in zip(layout.spans, keys)]
    return make_doc(req_id, (0, end), dev, result.selected.tolist(), trace.timings_ms, chunks)


def split_batch(trace: Any, seqs: Sequence[Any], config: Any) -> list[dict[int, list[float]]]:
    """Per-sequence dense deviation from a trace of a batched `Blender.run`.

    The blender concatenates the active tokens of all sequences, so positions
    repeat across sequences; the per-sequence share at each check layer follows
    from the same host arithmetic the blender uses (forced tokens + ceil(ratio *
    cached), clamped), applied in order of the check layers.
    """
    import torch

    from blend.config import num_recompute

    lens = [int(s.token_ids.numel()) for s in seqs]
    # The blender forces the question rows (outputs and probes) whatever `forced` says.
    tails = [min(n, getattr(s, "num_outputs", 0) + getattr(s, "num_probes", 0))
             for s, n in zip(seqs, lens)]
    forced = [(int(s.forced[:n - t].sum()) if s.forced is not None else 0) + t
              for s, n, t in zip(seqs, lens, tails)]
    cached = [n - f for n, f in zip(lens, forced)]
    out: list[dict[int, list[float]]] = [{} for _ in seqs]
    counts = list(lens)
    phases = list(zip(config.check_layers, config.ratios()))
    if getattr(config, "selection", "deviation") == "cheap":
        # One score before layer 0 (the question's probe), over every token, kept under
        # the last check layer.
        phases = [(max(config.check_layers), config.recomp_ratio)]
    for layer, ratio in phases:
        if layer not in trace.deviation:
            break  # the blend stopped early: nothing left to recompute
        pos, dev = trace.deviation[layer]
        at = 0
        for b, s in enumerate(seqs):
            p, d = pos[at:at + counts[b]], dev[at:at + counts[b]]
            at += counts[b]
            dense = torch.full((lens[b],), float("nan"))
            dense[p - s.start] = d.float()
            out[b][layer] = dense.tolist()
        counts = [min(f + num_recompute(ratio, c), n) for f, c, n in zip(forced, cached, counts)]
    return out


def timed_layer_hook(hook: Callable[[int], None], trace: Any) -> Callable[[int], None]:
    """Wrap a blender `layer_hook` to record per-layer times in `trace.timings_ms`.

    `load.<l>`: time inside the hook (chunk KV copy + RoPE re-rotation of layer l);
    `layer.<l>`: time from the end of layer l's hook to the next hook (layer l's
    compute); `load` and `layers`: their sums. Host wall clock: on CUDA it
    measures enqueue time unless the work syncs, so use it on CPU or with
    CUDA_LAUNCH_BLOCKING=1.
    """
    tm = trace.timings_ms
    state: dict[str, Any] = {"t": None, "prev": None}

    def run(layer: int) -> None:
        t0 = time.perf_counter()
        if state["prev"] is not None:
            ms = (t0 - state["t"]) * 1e3
            tm[f"layer.{state['prev']}"] = ms
            tm["layers"] = tm.get("layers", 0.0) + ms
        hook(layer)
        t1 = time.perf_counter()
        tm[f"load.{layer}"] = (t1 - t0) * 1e3
        tm["load"] = tm.get("load", 0.0) + (t1 - t0) * 1e3
        state.update(t=t1, prev=layer)

    return run


def write_request_trace(directory: str | os.PathLike, doc: dict[str, Any]) -> Path:
    """Write `doc` to `<directory>/<req_id>.json` atomically (tmp + rename); returns the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in doc["req_id"]) or "trace"
    path = d / f"{safe}.json"
    tmp = d / f".{safe}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path


def write_batch(directory: str | os.PathLike, trace: Any, seqs: Sequence[Any], config: Any,
                requests: Sequence[Any]) -> list[dict[str, Any]]:
    """One trace file per request of a blended batch (connector worker side)."""
    docs = []
    # CACHEBLEND_TRACE=summary: counts and timings only, no per-token lists (a benchmark that
    # traces thousands of 10k-token requests only wants each one's compute).
    summary = os.environ.get("CACHEBLEND_TRACE", "") == "summary"
    devs = [{} for _ in seqs] if summary else split_batch(trace, seqs, config)
    per = list(getattr(trace, "seq_token_layers", [])) + [None] * len(seqs)
    for req, seq, sel, dev, tl in zip(requests, seqs, trace.selected, devs, per):
        # What the blend computed for this request: context-token layer passes (probes
        # included) over its `blended_tokens` (the context computed here, probes excluded).
        probes = int(getattr(seq, "num_probes", 0))
        extra = {"blended_tokens": int(seq.token_ids.numel()) - probes, "probes": probes,
                 "selected_count": int(sel.numel())}
        if tl is not None:
            extra["token_layers"] = int(tl)
        doc = make_doc(req.req_id, (seq.start, seq.end), dev, [] if summary else sel.tolist(),
                       trace.timings_ms,
                       [(c.start, c.end, c.key) for c in req.chunks], extra)
        write_request_trace(directory, doc)
        docs.append(doc)
    return docs


def load_trace(source: str | os.PathLike | dict[str, Any]) -> Trace:
    """Read a trace document (path or dict) back; raises ValueError if it is not one."""
    doc = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if not isinstance(doc, dict) or doc.get("version") != TRACE_VERSION:
        raise ValueError(f"not a cacheblend trace (version {TRACE_VERSION}): {str(source)[:80]}")
    nan = float("nan")
    return Trace(
        req_id=doc["req_id"],
        context=(int(doc["context"][0]), int(doc["context"][1])),
        chunks=[(int(s), int(e), k) for s, e, k in doc.get("chunks", [])],
        deviation={int(k): [nan if x is None else float(x) for x in v]
                   for k, v in doc["deviation"].items()},
        selected=[int(p) for p in doc["selected"]],
        timings_ms=dict(doc.get("timings_ms", {})),
    )


def load_dir(directory: str | os.PathLike) -> dict[str, Trace]:
    """Every trace in a connector `trace_dir`, by request id."""
    out = {}
    for p in sorted(Path(directory).glob("*.json")):
        t = load_trace(p)
        out[t.req_id] = t
    return out
