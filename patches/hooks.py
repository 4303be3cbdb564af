"""Apply each patch point when its vLLM module is imported, or now if it already is.

`import blend` must stay cheap (importing vLLM takes seconds), and the plugin
must not import the GPU runner into an API-server process. So a patch point
is tied to its module: a `sys.meta_path` finder runs the patch right after
that module executes; a module already imported is patched at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.RLock()
# module name -> callbacks to run once the module has executed
_pending: dict[str, list[Callable[[Any], None]]] = {}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the real loader of watched modules to run callbacks after exec."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(loader, fullname)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec):  # noqa: ANN001
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._inner.exec_module(module)
        _fire(self._name, module)

    def __getattr__(self, item):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self._inner, item)


_finder = _PostImportFinder()


def _fire(name: str, module: Any) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
    for cb in callbacks:
        cb(module)


def when_imported(module: str, callback: Callable[[Any], None]) -> bool:
    """Run `callback(module)` now if imported, else right after its import.

    Returns True when it ran now.
    """
    with _lock:
        mod = sys.modules.get(module)
        if mod is None:
            _pending.setdefault(module, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return False
    callback(mod)
    return True


def is_pending(module: str) -> bool:
    with _lock:
        return module in _pending


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
