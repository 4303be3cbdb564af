"""Parse and validate a store spec at startup, so bad config fails loudly and early.

Forms: None / "local" / "local:PATH" / "ucm:PATH" / a dict such as
{"backend": "local", "path": ..., "memory_bytes": "4GiB", "disk_bytes": "64GiB"}.
Every problem is a ValueError naming the key and what is allowed.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

GiB = 1 << 30
BACKENDS = ("local", "ucm")
ALLOWED = {
    "local": {"backend", "path", "memory_bytes", "disk_bytes", "pin_memory", "promote"},
    "ucm": {"backend", "path", "block_size", "pipeline", "device_id", "io_direct",
            "unique_id", "verify", "ucm_config"},
}
DEFAULTS = {
    "local": {"memory_bytes": 2 * GiB, "disk_bytes": 32 * GiB, "pin_memory": False,
              "promote": True},
    "ucm": {"block_size": 2 << 20, "pipeline": "Posix", "device_id": 0, "io_direct": False,
            "unique_id": None, "verify": True, "ucm_config": {}},
}
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
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown store backend {backend!r}; allowed: "
                         f"{', '.join(BACKENDS)}")
    unknown = sorted(set(spec) - ALLOWED[backend])
    if unknown:
        raise ValueError(f"store: unknown key(s) {unknown} for backend {backend!r}; allowed: "
                         f"{sorted(ALLOWED[backend])}")
    cfg = {**DEFAULTS[backend], **spec}
    if backend == "local":
        cfg["path"] = _check_dir(cfg.get("path") or default_dir())
        cfg["memory_bytes"] = parse_size("memory_bytes", cfg["memory_bytes"])
        cfg["disk_bytes"] = parse_size("disk_bytes", cfg["disk_bytes"])
        cfg["pin_memory"] = _bool("pin_memory", cfg["pin_memory"])
        cfg["promote"] = _bool("promote", cfg["promote"])
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
