"""One logger per component, prefixed `[Blend.<Component>]`, level from `BLEND_LOG_LEVEL`."""

from __future__ import annotations

import logging
import os

_ROOT = "blend"
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    level = os.environ.get("BLEND_LOG_LEVEL", "INFO").upper()
    root.setLevel(getattr(logging, level, logging.INFO))
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.propagate = False
    _configured = True


class _Prefixed(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[Blend.{self.extra['component']}] {msg}", kwargs


def get_logger(component: str) -> logging.LoggerAdapter:
    """Logger whose lines start with `[Blend.<component>]`."""
    _configure()
    return _Prefixed(logging.getLogger(f"{_ROOT}.{component.lower()}"), {"component": component})
