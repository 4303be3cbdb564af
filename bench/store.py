"""Store throughput: GB/s of put and get per tier, lookup latency for 64 keys.

    python -m bench.store                 # CPU tiers (+ UCM Posix when UCM imports)
    python -m bench.store --gpu           # + host->device load of a blended request,
                                          #   UCM Cache|Posix on the GPU
Medians over repeats. Writes bench/results/store.json (or --out) and prints a table.
`blend` must be importable: where vLLM is absent (the UCM venv), `pip install --no-deps -e .`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from bench.common import gbps, kv_chunk_shape, median_s
from blend.store import format as fmt
from blend.store import open_store
from blend.store.disk import DiskTier

FP = "b" * 64
SHAPE = kv_chunk_shape(256)  # Llama-3-8B-shaped, 32 MiB in bf16


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def cpu_bench(root: Path, reps: int) -> dict:
    x = torch.randn(SHAPE).to(torch.bfloat16)
    nb = x.numel() * x.element_size()
    out = torch.empty_like(x)
    r: dict = {"chunk_shape": list(SHAPE), "dtype": "bfloat16", "chunk_bytes": nb}
    s = open_store({"path": str(root / "local"), "memory_bytes": "1GiB",
                    "disk_bytes": "8GiB"}, FP)
    k = key("m")
    i = iter(range(10**6))
    r["local_put"] = gbps(nb, median_s(lambda: s.put(key(f"p{next(i)}"), x), reps))
    s.put(k, x)
    r["memory_load"] = gbps(nb, median_s(lambda: s.load(k, out), reps))
    r["memory_get"] = gbps(nb, median_s(lambda: s.get(k), reps))
    d = DiskTier(root / "disk", 8 << 30, FP)
    j = iter(range(10**6))
    r["disk_put"] = gbps(nb, median_s(lambda: d.write(key(f"d{next(j)}"), x), reps))
    d.write(k, x)
    r["disk_load_page_cache"] = gbps(nb, median_s(lambda: d.read_into(k, out), reps))
    r["disk_get_page_cache"] = gbps(nb, median_s(lambda: d.read(k), reps))

    def cold_get():
        s.mem.clear()
        s.get(k)
    r["local_get_disk_hit_with_promotion"] = gbps(nb, median_s(cold_get, reps))
    assert torch.equal(s.get(k).view(torch.int16), x.view(torch.int16))
    keys = [key(f"l{n}") for n in range(64)]
    small = torch.randn(2, 2, 4, 2, 64).to(torch.bfloat16)
    for kk in keys[::2]:
        s.put(kk, small)
    s.mem.clear()  # half present on disk only, half absent: every key costs a stat
    r["lookup64_disk_ms"] = round(median_s(lambda: s.lookup(keys), reps * 10) * 1e3, 4)
    for kk in keys[::2]:
        s.get(kk)
    r["lookup64_memory_ms"] = round(median_s(lambda: s.lookup(keys[::2]), reps * 10) * 1e3, 4)
    return r


def ucm_bench(root: Path, reps: int, pipeline: str, device: str,
              ucm_config: dict | None = None) -> dict:
    try:
        import ucm  # noqa: F401
    except ImportError as e:
        return {"skipped": f"UCM not importable here ({e.name}); run under .venv312"}
    s = open_store({"backend": "ucm", "path": str(root / pipeline.replace("|", "_")),
                    "block_size": "2MiB", "pipeline": pipeline,
                    "ucm_config": ucm_config or {}}, FP)
    x = torch.randn(SHAPE).to(torch.bfloat16).to(device)
    nb = x.numel() * x.element_size()
    out = torch.empty_like(x)
    i = iter(range(10**6))
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def put():
        s.put(key(f"u{next(i)}"), x)
        sync()

    def load():
        s.load(key("u0"), out)
        sync()
    r = {"pipeline": pipeline, "device": device, "block_size": 2 << 20,
         "put": gbps(nb, median_s(put, reps))}
    r["load"] = gbps(nb, median_s(load, reps))
    r["get"] = gbps(nb, median_s(lambda: s.get(key("u0")), reps))
    got = s.get(key("u0"))
    r["bit_exact"] = bool(got is not None and torch.equal(got.view(torch.int16).to(device),
                                                          x.view(torch.int16)))
    r["errors"] = s.stats()["errors"]
    return r


def gpu_blend_load(root: Path, reps: int) -> dict:
    """Host -> device loading of chunk KV for one blended request: 8 chunks of 512
    tokens (Llama-3-8B-shaped, bf16, 512 MiB total) from the pinned memory tier into
    device buffers, one sync at the end."""
    shape = kv_chunk_shape(512)
    s = open_store({"path": str(root / "gpu"), "memory_bytes": "4GiB", "disk_bytes": "16GiB",
                    "pin_memory": True}, FP)
    keys = [key(f"g{c}") for c in range(8)]
    for c, k in enumerate(keys):
        s.put(k, torch.full(shape, float(c), dtype=torch.bfloat16))
    outs = [torch.empty(shape, dtype=torch.bfloat16, device="cuda") for _ in keys]
    nb = sum(o.numel() * o.element_size() for o in outs)

    def load_all():
        for k, o in zip(keys, outs):
            assert s.load(k, o)
        torch.cuda.synchronize()
    r = {"chunks": len(keys), "chunk_shape": list(shape), "bytes": nb,
         "memory_tier_pinned_h2d": gbps(nb, median_s(load_all, reps))}
    ok = all(bool((o == c).all()) for c, o in enumerate(outs))
    s.mem.clear()  # disk (page cache) -> pinned staging -> device

    def disk_all():
        s.mem.clear()
        for k, o in zip(keys, outs):
            assert s.load(k, o)
        torch.cuda.synchronize()
    r["disk_page_cache_to_device"] = gbps(nb, median_s(disk_all, max(2, reps // 2)))
    ok = ok and all(bool((o == c).all()) for c, o in enumerate(outs))
    pinned = torch.empty(nb, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nb, dtype=torch.uint8, device="cuda")

    def raw():
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
    r["raw_pinned_copy_limit"] = gbps(nb, median_s(raw, reps))
    r["bit_exact"] = ok
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--ucm-config", default="{}", help="extra raw UCM options (JSON)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.json"))
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                             "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()},
                 "targets": {"memory_get_gbps": 5, "disk_get_page_cache_gbps": 2,
                             "lookup64_ms": 1, "gpu_h2d_gbps": 25}}

    def section(name: str, fn) -> None:
        """Run one section; print and save at once, so a crash later loses nothing."""
        try:
            res[name] = fn()
        except Exception as e:  # record, don't lose the other numbers
            res[name] = {"error": repr(e)}
        print(f"== {name}", flush=True)
        for k, v in res[name].items():
            print(f"  {k:40s} {v}", flush=True)
        out.write_text(json.dumps(res, indent=1) + "\n")

    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        root = Path(tmp)
        if a.gpu:
            res["machine"]["gpu"] = torch.cuda.get_device_name()
            section("gpu_blend_load", lambda: gpu_blend_load(root, a.reps))
        if not a.skip_cpu:
            section("cpu", lambda: cpu_bench(root, a.reps))
        section("ucm_posix", lambda: ucm_bench(root, a.reps, "Posix", "cpu"))
        if a.gpu:
            section("ucm_cache_posix", lambda: ucm_bench(root, a.reps, "Cache|Posix", "cuda",
                                                         json.loads(a.ucm_config)))
    fmt.pool().shutdown(wait=False)


if __name__ == "__main__":
    main()
