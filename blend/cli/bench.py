"""`cacheblend bench quality`: the quality benchmark, with its arguments checked up front.

The benchmark itself is `bench/quality.py` in a source checkout (it is not
installed); this front end validates the arguments first so that a typo fails
in a second with a clear message, not after the model has loaded.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from blend.cli.store import _positive

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


def _meta(v: str) -> str:
    from blend.config import BlendConfig

    try:
        meta = json.loads(v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--meta: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise argparse.ArgumentTypeError("--meta: expected a JSON object of cache_fuse_metadata")
    try:
        BlendConfig.from_dict(meta)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return v


def cmd_quality(args: argparse.Namespace) -> int:
    if not SCRIPT.is_file():
        print(f"cacheblend bench quality: {SCRIPT} not found (run from a source checkout)",
              file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        print(f"cacheblend bench quality: --out: directory {out.parent} does not exist",
              file=sys.stderr)
        return 2
    argv = [str(SCRIPT), "--meta", args.meta, "--out", str(out)]
    if args.only:
        argv += ["--only", args.only]
    if args.n:
        argv += ["--n", str(args.n)]
    root = str(SCRIPT.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # `bench` is a top-level folder of the checkout
    sys.argv = argv
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return 0


def add_quality_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Register `quality` under `cacheblend bench`."""
    q = bench_sub.add_parser(
        "quality", help="KL / top-1 / greedy agreement vs full prefill (SmolLM2 prose), "
        "EM/F1 (Qwen2.5 SQuAD)",
        description="Blend quality against full prefill on real models and real text; writes "
        "a JSON file and a PNG plot next to it.")
    q.add_argument("--only", choices=["prose", "squad"], help="run one of the two sets")
    q.add_argument("--n", type=_positive, default=None,
                   help="prompts per set (default: prose 20, squad 40)")
    q.add_argument("--meta", type=_meta, default="{}",
                   help='extra cache_fuse_metadata as JSON, e.g. \'{"check_layers": [2]}\'')
    q.add_argument("--out", default=str(SCRIPT.parent / "results" / "quality.json"),
                   help="result JSON (default bench/results/quality.json)")
    q.set_defaults(func=cmd_quality)
