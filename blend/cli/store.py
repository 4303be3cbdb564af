"""`cacheblend store stats|inspect|clear` and `cacheblend trace`: look inside without a model.

The local store is a directory of self-describing files (`<root>/<xx>/<key>.kv`,
header = key, model fingerprint, dtype, shape, checksums), so these commands
read headers only: they need no model, no vLLM and never load a payload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from blend.store.disk import SUFFIX
from blend.store.spec import default_dir


class CliError(Exception):
    """Bad input: printed as one line, exit status 2."""


def _root(spec: str | None) -> Path:
    """The directory of a local store spec, which must already exist (never created here)."""
    spec = spec or "local"
    backend, _, path = spec.partition(":")
    if backend.strip().lower() != "local":
        raise CliError(f"store {spec!r}: only local stores can be listed "
                       "(a UCM store has no index to walk)")
    root = Path(path).expanduser() if path else default_dir()
    if not root.is_dir():
        raise CliError(f"store {spec!r}: no store directory at {root}")
    return root


def _entries(root: Path) -> list[Path]:
    return sorted(p for d in root.iterdir() if d.is_dir() and len(d.name) == 2
                  for p in d.glob(f"*{SUFFIX}"))


def _header(path: Path) -> dict[str, Any]:
    """Header fields of one entry, or its error reason (damage is reported, not raised)."""
    from blend.store import format as fmt
    from blend.store.base import StoreMiss

    st = path.stat()
    row: dict[str, Any] = {"key": path.name[: -len(SUFFIX)], "bytes": st.st_size,
                           "mtime": time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(st.st_mtime))}
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
            n = fmt.header_len_hint(head)
            if n > len(head):
                head += fh.read(n - len(head))
        h = fmt.decode(head)
        row.update(fingerprint=h.fingerprint, dtype=str(h.dtype).replace("torch.", ""),
                   shape=list(h.shape), tokens=h.shape[2] if len(h.shape) == 5 else None)
        if h.key != row["key"]:
            row["error"] = "wrong_key"
        elif st.st_size != h.header_len + h.payload_len:
            row["error"] = "truncated"
    except StoreMiss as exc:
        row["error"] = exc.reason
    except OSError as exc:
        row["error"] = f"io: {exc.strerror}"
    return row


def cmd_stats(args: argparse.Namespace) -> int:
    root = _root(args.store)
    rows = [_header(p) for p in _entries(root)]
    tmp = list((root / "tmp").glob("*")) if (root / "tmp").is_dir() else []
    fps = Counter(r.get("fingerprint", "?")[:16] for r in rows)
    out = {
        "path": str(root),
        "entries": len(rows),
        "bytes": sum(r["bytes"] for r in rows),
        "tokens": sum(r.get("tokens") or 0 for r in rows),
        "damaged": sum(1 for r in rows if "error" in r),
        "fingerprints": dict(fps),
        "dtypes": dict(Counter(r.get("dtype", "?") for r in rows)),
        "tmp_files": len(tmp),
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"store      {out['path']}")
    print(f"entries    {out['entries']} ({out['damaged']} damaged)")
    print(f"size       {out['bytes'] / 2**20:.1f} MiB, {out['tokens']} chunk tokens")
    print(f"models     {len(fps)} fingerprint(s): " +
          ", ".join(f"{k}... x{v}" for k, v in fps.most_common()))
    print(f"dtypes     {out['dtypes']}")
    print(f"temp files {out['tmp_files']} (writers in progress or crashed)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    root = _root(args.store)
    if args.keys:
        from blend.store.base import valid_key

        bad = [k for k in args.keys if not valid_key(k)]
        if bad:
            raise CliError(f"not a chunk key (64 lowercase hex digits): {bad[0]!r}")
        paths = [root / k[:2] / f"{k}{SUFFIX}" for k in args.keys]
        missing = [p.name[: -len(SUFFIX)] for p in paths if not p.is_file()]
        if missing:
            print(f"cacheblend store inspect: no entry for key {missing[0]}", file=sys.stderr)
            return 1
    else:
        paths = _entries(root)[: args.limit]
    rows = [_header(p) for p in paths]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'key':<18}{'tokens':>7}{'MiB':>8}  {'dtype':<9}{'fingerprint':<19}{'modified':<20}status")
    for r in rows:
        print(f"{r['key'][:16]}..{r.get('tokens') or '?':>7}{r['bytes'] / 2**20:>8.2f}  "
              f"{r.get('dtype', '?'):<9}{r.get('fingerprint', '?')[:16] + '...':<19}"
              f"{r['mtime']:<20}{r.get('error', 'ok')}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    root = _root(args.store)
    paths = _entries(root)
    if args.fingerprint:
        paths = [p for p in paths if _header(p).get("fingerprint", "").startswith(args.fingerprint)]
    if not args.yes:
        raise CliError(f"would delete {len(paths)} entries under {root}; pass --yes to do it")
    from blend.store.disk import DiskTier

    disk = DiskTier(root, 1 << 50, "")  # its lock keeps the byte counter right for live writers
    if args.fingerprint:
        n = sum(disk.remove(p.name[: -len(SUFFIX)]) for p in paths)
    else:
        n = len(paths)
        disk.clear()
    print(f"deleted {n} entries from {root}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from blend.trace import load_dir, load_trace

    src = Path(args.path)
    if not src.exists():
        raise CliError(f"{src}: no such trace file or directory")
    try:
        traces = list(load_dir(src).values()) if src.is_dir() else [load_trace(src)]
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"{src}: not a cacheblend trace ({exc})") from None
    if not traces:
        raise CliError(f"{src}: no *.json traces in this directory")
    for t in traces:
        n = t.context[1] - t.context[0]
        print(f"request {t.req_id}: context {t.context[0]}..{t.context[1]} ({n} tokens), "
              f"{len(t.chunks)} chunks, {len(t.selected)} recomputed "
              f"({t.recomputed_fraction():.1%})")
        for layer in t.check_layers:
            vals = sorted(x for x in t.deviation[layer] if x == x)
            if vals:
                med, p90 = (vals[min(len(vals) - 1, int(f * len(vals)))] for f in (0.5, 0.9))
                print(f"  layer {layer:>2}: {len(vals)} tokens measured, deviation "
                      f"median {med:.4g}, p90 {p90:.4g}, max {vals[-1]:.4g}")
        print("  timings ms: " + ", ".join(f"{k} {v:.1f}" for k, v in t.timings_ms.items()))
    return 0


def _guard(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CliError as exc:
            print(f"cacheblend {args.cmd}: {exc}", file=sys.stderr)
            return 2
    return run


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `store` and `trace` on the top-level `cacheblend` subparsers."""
    spec_help = "store spec: 'local' (default dir) or 'local:PATH'"
    s = sub.add_parser("store", help="look at or clear a chunk KV store")
    ssub = s.add_subparsers(dest="store_cmd", required=True)
    p = ssub.add_parser("stats", help="entries, bytes, models and damage in a store")
    p.add_argument("--store", default=os.environ.get("CACHEBLEND_STORE"), help=spec_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(cmd_stats))
    p = ssub.add_parser("inspect", help="list entries (headers only) or show given keys")
    p.add_argument("keys", nargs="*", help="chunk keys (default: every entry, up to --limit)")
    p.add_argument("--store", default=os.environ.get("CACHEBLEND_STORE"), help=spec_help)
    p.add_argument("--limit", type=_positive, default=50, help="entries listed (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(cmd_inspect))
    p = ssub.add_parser("clear", help="delete entries (all, or one model's)")
    p.add_argument("--store", default=os.environ.get("CACHEBLEND_STORE"), help=spec_help)
    p.add_argument("--fingerprint", default=None, help="only entries whose fingerprint starts so")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(func=_guard(cmd_clear))
    t = sub.add_parser("trace", help="summarize blend traces written to a connector trace_dir")
    t.add_argument("path", help="a trace .json file or a trace_dir")
    t.set_defaults(func=_guard(cmd_trace))


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n
