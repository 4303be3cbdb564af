"""`cacheblend` command line: verify the vLLM patches (and, with --model, the blend itself on
the user's engine), precompute chunk KV, run the TTFT bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _store_line(spec: str | None) -> tuple[bool, str]:
    from blend.store import open_store
    from blend.store.spec import parse

    try:
        cfg = parse(spec)
        store = open_store(spec, "0" * 64)
        store.lookup(["0" * 64])
        where = cfg.get("path")
        where = ",".join(map(str, where)) if isinstance(where, list) else str(where)
        return True, f"store: {cfg['backend']}:{where} reachable"
    except Exception as exc:  # noqa: BLE001 - reported, exit code says it
        return False, f"store: {spec or 'local'} UNREACHABLE ({exc})"


def cmd_verify(args: argparse.Namespace) -> int:
    from blend import patches

    rows = patches.verify_patches(import_modules=True)
    print("=== cacheblend patch verification ===")
    ok = True
    i = 0
    for st in rows:
        if st.name == "captured model":
            continue
        i += 1
        if st.name == "connector registered" and st.state == "INSTALLED":
            print(f"{i}. connector registered: {st.detail}")
        else:
            print(f"{i}. {st.line()}")
        ok &= st.ok
    good, line = _store_line(args.store)
    print(f"{i + 1}. {line}")
    ok &= good
    if not ok:
        print("some patch points are not in place; see docs/vllm_internals.md", file=sys.stderr)
        return 1
    if args.model:  # the master check on the user's own engine and model
        from blend.cli.verify_model import verify_model

        return verify_model(args)
    return 0


def _read_chunks(paths: list[str]) -> list[str]:
    chunks: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise SystemExit(f"cacheblend precompute: {p}: no such file")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        chunks.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise SystemExit(f"cacheblend precompute: {p}:{n}: expected "
                                         '{"text": ...} per line') from None
        else:
            chunks.append(path.read_text())
    if not chunks or not all(isinstance(c, str) and c.strip() for c in chunks):
        raise SystemExit("cacheblend precompute: no (non-empty) chunks given")
    return chunks


def cmd_precompute(args: argparse.Namespace) -> int:
    chunks = _read_chunks(args.chunks)
    from vllm import LLM

    import blend

    ktc = blend.kv_transfer_config(store=args.store)
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              kv_transfer_config=ktc)
    out = blend.precompute(llm, chunks)
    print(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cacheblend", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="print each vLLM patch point's status; with --model, "
                       "check that blended r=1.0 answers are plain vLLM's (PASS/FAIL)")
    v.add_argument("--store", default=None, help="store spec to check (default: local)")
    v.add_argument("--model", default=None,
                   help="model path or name: start plain vLLM and vLLM with the connector on it "
                        "and compare them (recomp_ratio=1.0, built-in prompts)")
    v.add_argument("--dtype", default=None, help="passed to vLLM (default: vLLM's)")
    v.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="passed to vLLM; each engine runs alone, one after the other")
    v.add_argument("--max-model-len", type=int, default=None, help="passed to vLLM")
    v.add_argument("--tensor-parallel-size", type=int, default=None, help="passed to vLLM")
    v.add_argument("--seed", type=int, default=None, help="passed to vLLM")
    v.add_argument("--enforce-eager", action="store_true", help="passed to vLLM")
    v.add_argument("--trust-remote-code", action="store_true", help="passed to vLLM")
    v.add_argument("--prompts", type=int, default=10,
                   help="built-in prompts to judge (default 10, the check's minimum)")
    v.add_argument("--timeout", type=float, default=1800,
                   help="seconds allowed to each engine (start-up and generation)")
    v.set_defaults(func=cmd_verify)
    p = sub.add_parser("precompute", help="compute and store chunk KV through vLLM")
    p.add_argument("--model", required=True, help="model path or name")
    p.add_argument("--store", default="local", help="store spec (default: local)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("chunks", nargs="+", help="text files (one chunk each) or .jsonl with 'text'")
    p.set_defaults(func=cmd_precompute)
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    from blend.cli.bench import add_quality_parser, cmd_ttft

    t = bsub.add_parser("ttft", help="TTFT, plain vs blended prefill on real vLLM: prints the "
                        "`python -m bench.ttft_vllm` line to run from a source checkout")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_ttft)
    from blend.cli.store import add_parsers

    add_quality_parser(bsub)
    add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
