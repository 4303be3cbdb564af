"""One blended step inside GPU vLLM under the torch profiler: launch-bound or kernel-bound?

`bench/ttft_vllm_gpu.py` says how long a blended TTFT takes; this says where the time goes,
from the same engine settings (vLLM defaults, the Llama-3-8B-shaped random model). The engine
core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the profiler sees the
worker's kernels. After `--warmup` blended requests it profiles `--runs` more, one at a time,
and writes `profile_vllm_gpu.json`: the wall time per request, the GPU kernel time, the number of
kernel launches, the CPU time inside the connector's `cacheblend.*` ranges, and the top kernels
and CPU ops. A blend whose kernel time is far below its wall time, with thousands of launches,
is launch-bound. `--trace` also writes a gzipped Chrome trace.

    python -m bench.profile_vllm_gpu --context 8192 [--chunks 8] [--tier host|gpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _summary(prof, wall_ms: list[float]) -> dict:
    from torch.autograd import DeviceType

    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                "cudaLaunchKernelExC", "cuLaunchKernelEx")]
    ranges: dict[str, float] = {}
    for e in events:
        if e.name.startswith("cacheblend."):
            ranges[e.name] = ranges.get(e.name, 0.0) + e.cpu_time_total / 1e3
    by_gpu = sorted(prof.key_averages(), key=lambda a: a.self_device_time_total, reverse=True)
    by_cpu = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    n = max(1, len(wall_ms))
    return {
        "requests": len(wall_ms),
        "wall_ms_per_request": round(statistics.median(wall_ms), 2),
        "kernel_ms_per_request": round(sum(k.device_time_total for k in kernels) / 1e3 / n, 2),
        "kernel_launches_per_request": round(len(launches) / n),
        "cacheblend_cpu_ms_per_request": {k: round(v / n, 2) for k, v in sorted(ranges.items())},
        "top_gpu": [{"name": a.key[:90], "ms": round(a.self_device_time_total / 1e3 / n, 3),
                     "calls": a.count // n} for a in by_gpu[:25]],
        "top_cpu": [{"name": a.key[:90], "ms": round(a.self_cpu_time_total / 1e3 / n, 3),
                     "calls": a.count // n} for a in by_cpu[:25]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunks", type=int, default=8,
                    help="chunks filling the context (16 at 8k, 32 at 32k: issue 23's RAG shapes)")
    ap.add_argument("--tier", choices=("host", "gpu"), default="host")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--util", type=float, default=0.6)
    ap.add_argument("--model", default=None, help="model folder (default: the random 8B shape)")
    ap.add_argument("--max-model-len", type=int, default=40000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--enforce-eager", action="store_true", help="CPU smoke runs only")
    ap.add_argument("--trace", action="store_true", help="also write a gzipped Chrome trace")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import blend
    from bench.ttft_vllm_gpu import Prompts, ensure_model
    from blend.assets import model_path

    model = Path(args.model) if args.model else ensure_model(model_path())
    tok = AutoTokenizer.from_pretrained(model)
    P = Prompts(tok)
    chunks = P.chunks(args.chunks, args.context // args.chunks - 8)
    work = Path(tempfile.mkdtemp(prefix="cacheblend-profile-"))
    store = {"backend": "local", "path": str(work / "kv"),
             "gpu_bytes": 0 if args.tier == "host" else "8GiB"}
    llm = LLM(model=str(model), dtype=args.dtype, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.util, seed=0, enforce_eager=args.enforce_eager,
              kv_transfer_config=blend.kv_transfer_config(store=store))
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    blend.precompute(llm, chunks)

    def one() -> float:
        ids, spans = P.build(chunks)
        t = time.perf_counter()
        llm.generate(blend.BlendPrompt(ids, spans), sp, use_tqdm=False)
        return (time.perf_counter() - t) * 1e3

    for _ in range(args.warmup):
        one()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        wall = [one() for _ in range(args.runs)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"context": args.context, "chunks": args.chunks, "tier": args.tier, "device": torch.cuda.get_device_name()
           if torch.cuda.is_available() else "cpu", **_summary(prof, wall)}
    (out / "profile_vllm_gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    if args.trace:
        raw = work / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(out / "profile_vllm_gpu.trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("top_")}, indent=1))
    for row in res["top_gpu"][:12]:
        print(f"{row['ms']:9.3f} ms {row['calls']:6d}  {row['name']}")
    shutil.rmtree(work, ignore_errors=True)
    os._exit(0)  # the in-process engine's threads do not outlive a clean teardown here


if __name__ == "__main__":
    main()
