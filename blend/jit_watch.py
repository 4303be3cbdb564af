"""Count the blend kernels' Triton compiles that happen after start-up.

A compile inside a step stalls every request of the server for seconds. The
worker's warm-up compiles what it can foresee; this hook (chained in front of
any hook already installed, such as vLLM's own JIT monitor) counts and logs
every later compile of a `blend` kernel with its specialisation, so a variant
the warm-up missed shows up in the metrics (`jit_compiles`) and the log.
"""

from __future__ import annotations

import threading

from blend.log import get_logger

log = get_logger("Connector")

_lock = threading.Lock()
_state = {"installed": False, "armed": False, "compiles": 0}


def install() -> bool:
    """Chain the hook once per process; False where this Triton has no compile hook."""
    try:
        from triton import knobs
    except ImportError:
        return False
    with _lock:
        if _state["installed"]:
            return True
        rt = getattr(knobs, "runtime", None)
        if rt is None or not hasattr(rt, "jit_post_compile_hook"):
            return False
        prev = rt.jit_post_compile_hook

        def hook(*args, **kwargs):
            _seen(kwargs)
            return prev(*args, **kwargs) if prev is not None else None

        rt.jit_post_compile_hook = hook
        _state["installed"] = True
    return True


def arm() -> None:
    """From now on every blend-kernel compile counts (call after the warm-up)."""
    _state["armed"] = True


def compiles() -> int:
    """Blend-kernel compiles since `arm()`."""
    return _state["compiles"]


def _seen(kwargs: dict) -> None:
    fn = kwargs.get("fn")
    module = getattr(fn, "module", "") or ""
    module = getattr(module, "__name__", module)
    if not _state["armed"] or not str(module).startswith("blend."):
        return
    with _lock:
        _state["compiles"] += 1
    log.warning("Triton compiled %s after start-up (the warm-up missed this variant): %s",
                getattr(fn, "name", "?"), kwargs.get("repr", ""))
