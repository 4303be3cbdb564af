"""Remember the model each vLLM model runner loads, so the worker-side connector finds it.

vLLM gives a KV connector its KV caches but never the model. CacheBlend has to
run the model's own layers, so we wrap the runners' `load_model` (CPU and GPU,
V1 and V2 runners) and record the loaded `nn.Module` in this process. No vLLM
source is edited; the worker connector reads `captured_model()` lazily, after
the runner has loaded.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

from blend.log import get_logger

log = get_logger("Patch")

_WRAPPED_FLAG = "__blend_capture__"


@dataclass
class Captured:
    """The model loaded in this process and who loaded it."""

    model: Any  # torch.nn.Module
    runner: str  # runner class name, e.g. "CPUModelRunner"
    vllm_config: Any


_lock = threading.Lock()
_captured: Captured | None = None


def record(runner: Any) -> None:
    """Store the runner's loaded model (called right after `load_model`)."""
    global _captured
    model = getattr(runner, "model", None)
    if model is None and hasattr(runner, "get_model"):
        try:
            model = runner.get_model()
        except Exception:  # noqa: BLE001 - a runner without a model yet
            model = None
    if model is None:
        log.warning("model capture: %s.load_model returned without a model", type(runner).__name__)
        return
    with _lock:
        _captured = Captured(model, type(runner).__name__, getattr(runner, "vllm_config", None))
    log.debug("model capture: %s loaded %s", type(runner).__name__, type(model).__name__)


def captured() -> Captured | None:
    """What this process's model runner loaded, or None before loading."""
    return _captured


def captured_model() -> Any:
    """The loaded model; raises with the fix when nothing was captured."""
    if _captured is None:
        raise RuntimeError(
            "cacheblend: no vLLM model was captured in this process. The model-capture "
            "patch wraps the model runners' load_model; it is installed by the "
            "`vllm.general_plugins` entry point `cacheblend`. Run `cacheblend verify`, "
            "and check that BLEND_DISABLE_PATCHES is not set and that the package is "
            "installed (`pip install -e .`)."
        )
    return _captured.model


def is_wrapped(fn: Any) -> bool:
    return bool(getattr(fn, _WRAPPED_FLAG, False))


def wrap_load_model(cls: type, attr: str = "load_model") -> bool:
    """Wrap `cls.load_model` once; returns False when it was already wrapped."""
    orig = cls.__dict__.get(attr)
    if orig is None:
        # Inherited: wrap the inherited function on this class so subclasses share it.
        orig = getattr(cls, attr)
    if is_wrapped(orig):
        return False

    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        record(self)
        return out

    setattr(load_model, _WRAPPED_FLAG, True)
    setattr(cls, attr, load_model)
    return True


def _reset_for_tests() -> None:
    global _captured
    with _lock:
        _captured = None
