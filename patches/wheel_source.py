"""vLLM's Python source read from a wheel (or an unpacked tree) without importing it.

Checking a vLLM release we have not installed must not need its torch, its CUDA or its
dependencies; the patch points and the APIs we rely on are all visible in the source, so
the checker parses modules with `ast` and resolves names through imports and base classes.
"""

from __future__ import annotations

import ast
import re
import zipfile
from functools import lru_cache
from pathlib import Path


class VllmSource:
    """The `vllm` package's `.py` files from a wheel zip or a folder holding `vllm/`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self._files = {str(p.relative_to(self.path)): p for p in self.path.rglob("vllm/**/*.py")}
            self._zip = None
        else:
            self._zip = zipfile.ZipFile(self.path)
            self._files = {n: n for n in self._zip.namelist() if n.endswith(".py")}
        self.version = self._version()
        self._tree = lru_cache(maxsize=None)(self._parse)

    def _version(self) -> str:
        """From the wheel's METADATA, else `vllm/_version.py`, else the file name."""
        if self._zip is not None:
            for n in self._zip.namelist():
                if n.endswith(".dist-info/METADATA"):
                    m = re.search(r"^Version: (\S+)", self._zip.read(n).decode(), re.M)
                    if m:
                        return m.group(1)
        text = self.text("vllm._version") or ""
        m = re.search(r"^(?:__version__|version)\s*=\s*(?:\w+\s*=\s*)?['\"]([^'\"]+)", text, re.M)
        if m:
            return m.group(1)
        m = re.search(r"vllm(?:_cpu)?-(\d+\.\d+[^-]*)", self.path.name)
        return m.group(1) if m else "unknown"

    def file_of(self, module: str) -> str | None:
        """'vllm.a.b' -> 'vllm/a/b.py' or 'vllm/a/b/__init__.py', if present."""
        base = module.replace(".", "/")
        for cand in (base + ".py", base + "/__init__.py"):
            if cand in self._files:
                return cand
        return None

    def text(self, module: str) -> str | None:
        f = self.file_of(module)
        if f is None:
            return None
        if self._zip is not None:
            return self._zip.read(f).decode("utf-8", "replace")
        return Path(self._files[f]).read_text(encoding="utf-8", errors="replace")

    def _parse(self, module: str) -> ast.Module | None:
        t = self.text(module)
        return None if t is None else ast.parse(t)

    def tree(self, module: str) -> ast.Module | None:
        return self._tree(module)

    def modules_under(self, package: str) -> list[str]:
        pre = package.replace(".", "/") + "/"
        return sorted(f[:-3].replace("/", ".") for f in self._files
                      if f.startswith(pre) and not f.endswith("__init__.py"))

    # ---------------------------------------------------------------- names
    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        is_pkg = (self.file_of(module) or "").endswith("__init__.py")
        pkg = module if is_pkg else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        return f"{pkg}.{node.module}" if node.module else pkg

    def _top_statements(self, tree: ast.Module):
        """Top-level statements, including those under `if`/`try` (TYPE_CHECKING, fallbacks)."""
        stack = list(tree.body)
        while stack:
            st = stack.pop(0)
            if isinstance(st, ast.If):
                stack[:0] = st.body + st.orelse
            elif isinstance(st, ast.Try):
                stack[:0] = st.body + st.orelse + [s for h in st.handlers for s in h.body]
            else:
                yield st

    def resolve(self, module: str, name: str, _seen: frozenset = frozenset()) -> tuple[str, ast.AST] | None:
        """Where `module.name` is defined: (module, node), following imports and `*`."""
        if (module, name) in _seen or len(_seen) > 30:
            return None
        seen = _seen | {(module, name)}
        tree = self.tree(module)
        if tree is None:
            return None
        stars = []
        for st in self._top_statements(tree):
            if isinstance(st, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and st.name == name:
                return module, st
            if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                  for t in st.targets):
                return module, st
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) \
                    and st.target.id == name:
                return module, st
            if isinstance(st, ast.ImportFrom):
                src = self._absolute(module, st)
                for a in st.names:
                    if a.name == "*":
                        stars.append(src)
                    elif (a.asname or a.name) == name:
                        sub = f"{src}.{a.name}"
                        if self.file_of(sub):
                            return sub, self.tree(sub)
                        return self.resolve(src, a.name, seen)
            if isinstance(st, ast.Import):
                for a in st.names:
                    if (a.asname or a.name.split(".")[0]) == name and self.file_of(a.name):
                        return a.name, self.tree(a.name)
        if self.file_of(f"{module}.{name}"):  # a submodule
            return f"{module}.{name}", self.tree(f"{module}.{name}")
        for src in stars:
            hit = self.resolve(src, name, seen)
            if hit:
                return hit
        if self._lazy_name(tree, name):  # `__getattr__` over a table of names (vllm/__init__)
            return module, tree
        return None

    @staticmethod
    def _lazy_name(tree: ast.Module, name: str) -> bool:
        has_getattr = any(isinstance(s, ast.FunctionDef) and s.name == "__getattr__" for s in tree.body)
        return has_getattr and any(isinstance(n, ast.Constant) and n.value == name
                                   for n in ast.walk(tree))

    def find_class(self, module: str, name: str) -> tuple[str, ast.ClassDef] | None:
        hit = self.resolve(module, name)
        if hit and isinstance(hit[1], ast.ClassDef):
            return hit[0], hit[1]
        return None

    def member(self, module: str, cls: str, member: str, _depth: int = 0
               ) -> tuple[str, ast.AST] | None:
        """`cls.member` in `module`, here or in a base class: (module it is in, its node)."""
        found = self.find_class(module, cls)
        if found is None or _depth > 8:
            return None
        mod, node = found
        hit = class_member(node, member)
        if hit is not None:
            return mod, hit
        for base in node.bases:
            if isinstance(base, ast.Name):
                got = self.member(mod, base.id, member, _depth + 1)
                if got:
                    return got
        return None


def class_member(node: ast.ClassDef, member: str) -> ast.AST | None:
    """A def, a class-level field, or a `self.member` assignment inside one of its methods."""
    for st in node.body:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)) and st.name == member:
            return st
        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) \
                and st.target.id == member:
            return st
        if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == member
                                              for t in st.targets):
            return st
    for fn in node.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for n in ast.walk(fn):
            targets = n.targets if isinstance(n, ast.Assign) else \
                [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else []
            for t in [e for x in targets for e in (x.elts if isinstance(x, ast.Tuple) else [x])]:
                if isinstance(t, ast.Attribute) and t.attr == member \
                        and isinstance(t.value, ast.Name) and t.value.id == "self":
                    return n
    return None


def param_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Positional and keyword parameter names, without self/cls; '**' for **kwargs."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    if a.kwarg:
        names.append("**")
    return names
