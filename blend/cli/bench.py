"""`cacheblend bench quality|ttft`: check a benchmark's arguments, then say how to run it.

The benchmarks live in a source checkout (`bench/`, run as `python -m bench.NAME` from
its root); the installed package never runs code from a checkout. These front ends
validate the arguments against the installed `blend` first, so that a typo fails in a
second with a clear message, and print the command line to run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from blend.cli.store import _positive


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


def _print_command(name: str, argv: list[str]) -> int:
    """Print how to run benchmark `name` from a checkout; exit 2, since nothing ran."""
    print("cacheblend bench: the benchmark is not installed; from the root of a source "
          "checkout run:", file=sys.stderr)
    print(shlex.join([sys.executable, "-m", f"bench.{name}", *argv]))
    return 2


def cmd_quality(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        print(f"cacheblend bench quality: --out: directory {out.parent} does not exist",
              file=sys.stderr)
        return 2
    argv = ["--meta", args.meta, "--out", str(out)]
    if args.only:
        argv += ["--only", args.only]
    if args.n:
        argv += ["--n", str(args.n)]
    return _print_command("quality", argv)


def cmd_ttft(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    return _print_command("ttft_vllm", rest[1:] if rest[:1] == ["--"] else rest)


def add_quality_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Register `quality` under `cacheblend bench`."""
    q = bench_sub.add_parser(
        "quality", help="KL / top-1 / greedy agreement vs full prefill (SmolLM2 prose), "
        "EM/F1 (Qwen2.5 SQuAD): checks the arguments, prints the `python -m bench.quality` line",
        description="Blend quality against full prefill on real models and real text; writes "
        "a JSON file and a PNG plot next to it. Runs from a source checkout: this checks the "
        "arguments and prints the command.")
    q.add_argument("--only", choices=["prose", "squad"], help="run one of the two sets")
    q.add_argument("--n", type=_positive, default=None,
                   help="prompts per set (default: prose 20, squad 40)")
    q.add_argument("--meta", type=_meta, default="{}",
                   help='extra cache_fuse_metadata as JSON, e.g. \'{"check_layers": [2]}\'')
    q.add_argument("--out", default="bench/results/quality.json",
                   help="result JSON (default bench/results/quality.json)")
    q.set_defaults(func=cmd_quality)
