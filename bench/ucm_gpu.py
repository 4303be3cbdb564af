"""UCM `Cache|Posix` on the GPU: throughput, and whether the process exits cleanly.

Each UCM config runs in its own child process with a deadline, so a hang is
recorded instead of stalling the run. (The "hang" seen before was UCM's Cache
layer mapping its default 256 GiB `cache_buffer_capacity_gb` of /dev/shm on a
128 GiB host; `UcmStore` now defaults to 4 and refuses what does not fit.) Per config: store creation time, put /
load / get GB/s of a 64 MiB bf16 chunk (2 MiB blocks, device buffers),
bit-exactness, a second store in the same process, and the time from the
child's last line to its exit.

    python3 -m bench.ucm_gpu [--out bench/results/ucm_gpu.json] [--deadline 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import child_env, python_m

CONFIGS = {
    # UCM's own default cache_buffer_capacity_gb is 256 GiB of /dev/shm: on the 128 GiB H100
    # host it filled memory and was killed (and its left-over file starved later runs).
    "cacheblend default (cache_buffer_capacity_gb=4)": {},
    "cache_buffer_capacity_gb=4, no close()": {"_no_close": True},
    "cache_buffer_capacity_gb=8": {"cache_buffer_capacity_gb": 8},
    "cache_buffer_capacity_gb=4, share_buffer_enable=false": {"share_buffer_enable": False},
}


def child(root: str, ucm_config: dict, reps: int) -> None:
    """Runs in the child: prints one JSON line per phase."""
    import torch

    from bench.common import gbps, median_s
    from blend.store import open_store

    def say(**kw) -> None:
        print(json.dumps(kw), flush=True)

    def rate(nbytes: int, fn) -> float:
        def synced() -> None:
            fn()
            torch.cuda.synchronize()
        torch.cuda.synchronize()
        return gbps(nbytes, median_s(synced, reps))

    fp = "f" * 16
    no_close = ucm_config.pop("_no_close", False)
    t = time.perf_counter()
    s = open_store({"backend": "ucm", "path": root, "block_size": "2MiB",
                    "pipeline": "Cache|Posix", "ucm_config": ucm_config}, fp)
    say(phase="create", s=round(time.perf_counter() - t, 2))
    x = torch.randn(32, 2, 256, 8, 128, device="cuda").to(torch.bfloat16)  # 64 MiB
    nb = x.numel() * x.element_size()
    keys = iter(f"{i:064x}" for i in range(10**6))
    k0 = next(keys)
    assert s.put(k0, x)
    out = torch.empty_like(x)
    res = {"put_gbps": rate(nb, lambda: s.put(next(keys), x)),
           "load_gbps": rate(nb, lambda: s.load(k0, out)),
           "get_gbps": rate(nb, lambda: s.get(k0))}
    got = s.get(k0)
    res["bit_exact"] = bool(s.load(k0, out) and torch.equal(out, x) and got is not None
                            and torch.equal(got.to("cuda"), x))
    res["errors"] = s.stats()["errors"]
    say(phase="io", **res)
    t = time.perf_counter()
    s2 = open_store({"backend": "ucm", "path": root + "_2", "block_size": "2MiB",
                     "pipeline": "Cache|Posix", "ucm_config": ucm_config}, fp)
    say(phase="second_store", s=round(time.perf_counter() - t, 2),
        ok=bool(s2.put(k0, x) and s2.lookup([k0]) == [True]))
    if not no_close:
        t = time.perf_counter()
        s.close()
        s2.close()
        say(phase="close", s=round(time.perf_counter() - t, 2))
    say(phase="done", t=time.time(), shm=sorted(p.name for p in Path("/dev/shm").glob("uc_shm*")))


def run(name: str, cfg: dict, deadline: float, reps: int) -> dict:
    root = tempfile.mkdtemp(prefix="ucm-gpu-")
    Path(root + "_2").mkdir()
    cmd = python_m("bench.ucm_gpu", "--child", root, "--config", json.dumps(cfg),
                   "--reps", str(reps))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env())
    rec: dict = {"config": cfg, "phases": {}}
    t_done = None
    try:
        out, err = p.communicate(timeout=deadline)
        rec["rc"] = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rec["rc"] = "killed at deadline"
    t_end, t_wall = time.perf_counter(), time.time()
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        rec["phases"][d.pop("phase")] = d
    if "done" in rec["phases"]:
        t_done = rec["phases"].pop("done")
    rec["wall_s"] = round(t_end - t0, 1)
    rec["exit_after_done_s"] = round(t_wall - t_done["t"], 2) if t_done else None
    rec["exited_cleanly"] = rec["rc"] == 0 and t_done is not None
    rec["shm_after_exit"] = sorted(p.name for p in Path("/dev/shm").glob("uc_shm*"))
    rec["stderr_tail"] = err[-1500:]
    print(f"== {name}: rc={rec['rc']} wall={rec['wall_s']}s phases={rec['phases']}", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--config", default="{}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=120)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ucm_gpu.json"))
    a = ap.parse_args()
    if a.child:
        child(a.child, json.loads(a.config), a.reps)
        return
    import torch

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "python": sys.version.split()[0], "chunk_bytes": 64 << 20, "block_size": 2 << 20,
           "runs": {}}
    for name, cfg in CONFIGS.items():
        res["runs"][name] = run(name, cfg, a.deadline, a.reps)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
