"""Parse and validate a store spec at startup, so bad config fails loudly and early.

Forms: None / "local" / "local:PATH" / "ucm:PATH" / a dict such as
{"backend": "local", "path": ..., "memory_bytes": "4GiB", "disk_bytes": "64GiB"}.
Every problem is a ValueError naming the key and what is allowed.

Defaults are sized from the machine (see `default_memory_bytes`): a 2 GiB host
tier does not hold one 32k-token prompt of an 8B model (4.3 GB of chunk KV).
`gpu_bytes` sizes the worker's GPU tier (`blend.store.gpu_tier.DeviceTier`),
which sits in front of every backend; "auto" is resolved in the worker once
vLLM has taken its KV cache, because only then is the free memory known.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

GiB = 1 << 30
STORE_BACKENDS = ("local", "ucm")
ALLOWED = {
    "local": {"backend", "path", "memory_bytes", "disk_bytes", "pin_memory", "promote",
              "gpu_bytes", "memory_policy"},
    "ucm": {"backend", "path", "block_size", "pipeline", "device_id", "io_direct",
            "unique_id", "verify", "ucm_config", "gpu_bytes"},
}
DEFAULTS = {
    "local": {"memory_bytes": "auto", "disk_bytes": 32 * GiB, "pin_memory": "auto",
              # segmented LRU kept the hot chunks' hit rate through a churn of new documents
              # where LRU lost it (bench/store_policy.py)
              "promote": True, "gpu_bytes": "auto", "memory_policy": "slru"},
    "ucm": {"block_size": 2 << 20, "pipeline": "Posix", "device_id": 0, "io_direct": False,
            "unique_id": None, "verify": True, "ucm_config": {}, "gpu_bytes": "auto"},
}
MIN_MEMORY, MAX_MEMORY = 2 * GiB, 64 * GiB

PIPELINES = ("Posix", "Cache|Posix")
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1 << 10, "M": 10**6, "MB": 10**6,
          "MIB": 1 << 20, "G": 10**9, "GB": 10**9, "GIB": 1 << 30, "T": 10**12, "TB": 10**12,
          "TIB": 1 << 40}


def default_dir() -> Path:
    home = os.environ.get("CACHEBLEND_HOME") or os.path.join("~", ".cache", "cacheblend")
    return Path(home).expanduser() / "kv"


def parse_size(name: str, v: Any, lo: int = 1, hi: int = 1 << 50) -> int:
    """Bytes from an int or a string like '512MiB' / '4GB'; within [lo, hi]."""
    if isinstance(v, bool):
        raise ValueError(f"{name}: expected a byte size, got {v!r}")
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", v.upper())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"{name}: cannot parse size {v!r} (e.g. 4096, '512MiB', '4GB')")
        v = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name}: {v!r} out of range; allowed {lo}..{hi} bytes")
    return v


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_memory_bytes(total: int | None = None) -> int:
    """Host tier default: a fifth of the machine's RAM, between 2 and 64 GiB."""
    total = _mem_total() if total is None else total
    return min(MAX_MEMORY, max(MIN_MEMORY, total // 5))


def _gpu_bytes(v: Any) -> int | str:
    """'auto', or a byte size (0 turns the GPU tier off)."""
    if v == "auto":
        return v
    return parse_size("gpu_bytes", v, lo=0)


def _check_dir(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path: expected a directory path, got {path!r}")
    p = Path(path).expanduser()
    try:
        if not p.is_dir():
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"path: directory {p} does not exist and cannot be created "
                         f"({e.strerror})") from None
    probe = p / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"path: directory {p} is not writable ({e.strerror})") from None
    return p


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected true/false, got {v!r}")
    return v


def parse(spec: str | dict | None) -> dict:
    """Normalised, validated config dict (backend, path, ...)."""
    if spec is None:
        spec = {"backend": "local"}
    elif isinstance(spec, str):
        backend, _, path = spec.partition(":")
        spec = {"backend": backend.strip().lower()}
        if path:
            spec["path"] = path
    elif isinstance(spec, dict):
        spec = dict(spec)
        spec.setdefault("backend", "local")
    else:
        raise ValueError(f"store: expected a string, a dict or None, got {type(spec).__name__}")
    backend = spec["backend"]
    if backend not in STORE_BACKENDS:
        raise ValueError(f"backend: unknown store backend {backend!r}; allowed: "
                         f"{', '.join(STORE_BACKENDS)}")
    unknown = sorted(set(spec) - ALLOWED[backend])
    if unknown:
        raise ValueError(f"store: unknown key(s) {unknown} for backend {backend!r}; allowed: "
                         f"{sorted(ALLOWED[backend])}")
    cfg = {**DEFAULTS[backend], **spec}
    cfg["gpu_bytes"] = _gpu_bytes(cfg["gpu_bytes"])
    if backend == "local":
        cfg["path"] = _check_dir(cfg.get("path") or default_dir())
        mem = cfg["memory_bytes"]
        cfg["memory_bytes"] = (default_memory_bytes() if mem == "auto"
                               else parse_size("memory_bytes", mem))
        cfg["disk_bytes"] = parse_size("disk_bytes", cfg["disk_bytes"])
        if cfg["pin_memory"] != "auto":
            cfg["pin_memory"] = _bool("pin_memory", cfg["pin_memory"])
        cfg["promote"] = _bool("promote", cfg["promote"])
        from blend.store.memory import POLICIES

        if cfg["memory_policy"] not in POLICIES:
            raise ValueError(f"memory_policy: {cfg['memory_policy']!r} not supported; allowed: "
                             f"{', '.join(POLICIES)}")
        return cfg
    if "path" not in spec:
        raise ValueError("path: the ucm backend needs a storage directory (e.g. 'ucm:/mnt/kv')")
    paths = cfg["path"] if isinstance(cfg["path"], (list, tuple)) else str(cfg["path"]).split(",")
    cfg["path"] = [_check_dir(p) for p in paths]
    cfg["block_size"] = parse_size("block_size", cfg["block_size"], lo=4096, hi=1 << 30)
    if cfg["pipeline"] not in PIPELINES:
        raise ValueError(f"pipeline: {cfg['pipeline']!r} not supported; allowed: {PIPELINES}")
    if not isinstance(cfg["device_id"], int) or isinstance(cfg["device_id"], bool) \
            or not 0 <= cfg["device_id"] < 1024:
        raise ValueError(f"device_id: {cfg['device_id']!r} out of range; allowed 0..1023")
    cfg["io_direct"] = _bool("io_direct", cfg["io_direct"])
    cfg["verify"] = _bool("verify", cfg["verify"])
    if cfg["io_direct"] and cfg["block_size"] % 4096:
        raise ValueError("block_size: must be a multiple of 4096 with io_direct")
    if not isinstance(cfg["ucm_config"], dict):
        raise ValueError("ucm_config: expected a dict of raw UCM store options")
    return cfg
