"""Check a vLLM release against everything cacheblend touches, from its wheel alone.

    python -m blend.patches.check_wheel vllm-0.29.0-...whl [more wheels or unpacked trees]

A minor version we have not run is only as safe as the reading of its source; this makes
the reading repeatable. For each wheel it checks, by parsing (never importing) vLLM:
the patch points of the table (module file, class, method), the connector base class
(abstract methods all overridden, the parameter names of each override, the members we
use), every `vllm` import in our source, the attributes we read off vLLM objects, each
attention backend's name and KV view, and where `start_load_kv` runs relative to the
forward. One line per point: OK, MISSING or CHANGED, with the file. Exit status 1 when
any required point is not OK.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

from . import table, vllm_api
from .wheel_source import VllmSource, param_names


@dataclass(frozen=True)
class Row:
    status: str  # OK | MISSING | CHANGED
    what: str
    file: str = ""
    optional: bool = False

    def line(self) -> str:
        opt = " (optional)" if self.optional and self.status != "OK" else ""
        return f"{self.status:<8} {self.what}{opt}" + (f"  [{self.file}]" if self.file else "")

    @property
    def bad(self) -> bool:
        return self.status != "OK" and not self.optional


def _ours() -> tuple[Path, Path]:
    import blend

    return Path(blend.__file__).parent, Path(__file__).parent


def our_vllm_imports() -> list[tuple[str, str, str]]:
    """(module, name, where) for every `from vllm... import name` / `import vllm` in our code."""
    out: dict[tuple[str, str], str] = {}
    blend_dir, patches_dir = _ours()
    files = sorted(set(blend_dir.rglob("*.py")) | set(patches_dir.rglob("*.py")))
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        where = f"{f.parent.name}/{f.name}"
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and not n.level and n.module \
                    and (n.module == "vllm" or n.module.startswith("vllm.")):
                for a in n.names:
                    out.setdefault((n.module, a.name), where)
            elif isinstance(n, ast.Import):
                for a in n.names:
                    if a.name == "vllm" or a.name.startswith("vllm."):
                        out.setdefault((a.name, ""), where)
    return [(m, name, w) for (m, name), w in sorted(out.items())]


def our_overrides() -> dict[str, ast.FunctionDef]:
    """BlendConnector's public methods (and __init__), read from our source."""
    blend_dir, _ = _ours()
    tree = ast.parse((blend_dir / "connector" / "__init__.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef)
               and n.name == vllm_api.CONNECTOR_CLASS)
    return {f.name: f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (f.name == "__init__" or not f.name.startswith("_"))}


def _file(src: VllmSource, module: str) -> str:
    return src.file_of(module) or module


def check_points(src: VllmSource, points: tuple[table.PatchPoint, ...]) -> list[Row]:
    rows = []
    for p in points:
        what = f"patch point {p.name}: {p.module}:{p.target}"
        if src.file_of(p.module) is None:
            rows.append(Row("MISSING", what + " (no such module)", p.module, p.optional))
            continue
        cls, _, meth = p.target.partition(".")
        hit = src.member(p.module, cls, meth) if meth else src.find_class(p.module, cls)
        rows.append(Row("OK" if hit else "MISSING", what, _file(src, hit[0] if hit else p.module),
                        p.optional))
        if hit and p.kind == "prompt_spans":
            rows += _prompt_spans_details(src, p, hit[1])
    return rows


def _prompt_spans_details(src: VllmSource, p: table.PatchPoint, fn: ast.AST) -> list[Row]:
    """Our wrapper takes `(prompts, params, ...)` positionally and calls `self._params_to_seq`."""
    cls = p.target.split(".")[0]
    names = param_names(fn) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
    f = _file(src, p.module)
    rows = [Row("OK" if names[:2] == ["prompts", "params"] else "CHANGED",
                f"prompt spans: {p.target} takes (prompts, params, ...): vLLM ({', '.join(names)})", f)]
    hit = src.member(p.module, cls, "_params_to_seq")
    rows.append(Row("OK" if hit else "MISSING", f"prompt spans: {cls}._params_to_seq", f))
    return rows


def check_connector_base(src: VllmSource) -> list[Row]:
    mod, cls = vllm_api.BASE_MODULE, vllm_api.BASE_CLASS
    found = src.find_class(mod, cls)
    if found is None:
        return [Row("MISSING", f"connector base {mod}:{cls}", _file(src, mod))]
    f = _file(src, found[0])
    rows = [Row("OK", f"connector base {cls}", f)]
    ours = our_overrides()
    for node in found[1].body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, (ast.Name, ast.Attribute)) and getattr(d, "id", getattr(d, "attr", ""))
                == "abstractmethod" for d in node.decorator_list):
            status = "OK" if node.name in ours else "MISSING"
            rows.append(Row(status, f"abstract {cls}.{node.name} overridden by ours", f))
    for name, fn in ours.items():
        hit = src.member(mod, cls, name)
        what = f"override {cls}.{name}"
        opt = name in vllm_api.OPTIONAL_OVERRIDES
        if hit is None:
            rows.append(Row("MISSING", what + " (vLLM never calls it)", f, opt))
            continue
        base_fn = hit[1]
        if isinstance(base_fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            theirs, mine = param_names(base_fn), param_names(fn)
            if theirs != mine:
                rows.append(Row("CHANGED", f"{what}: vLLM ({', '.join(theirs)}) vs ours "
                                f"({', '.join(mine)})", _file(src, hit[0]), opt))
                continue
        rows.append(Row("OK", what, _file(src, hit[0]), opt))
    for name in vllm_api.BASE_MEMBERS:
        hit = src.member(mod, cls, name)
        rows.append(Row("OK" if hit else "MISSING", f"base member {cls}.{name}", f))
    return rows


def check_imports(src: VllmSource) -> list[Row]:
    rows = []
    for module, name, where in our_vllm_imports():
        what = f"import {module}" + (f":{name}" if name else "") + f" (used in {where})"
        if src.file_of(module) is None:
            rows.append(Row("MISSING", what + " (no such module)", module))
        elif name and src.resolve(module, name) is None:
            rows.append(Row("MISSING", what, _file(src, module)))
        else:
            rows.append(Row("OK", what, _file(src, module)))
    return rows


def check_members(src: VllmSource) -> list[Row]:
    rows = []
    for m in vllm_api.MEMBERS:
        hit = src.member(m.module, m.cls, m.member)
        rows.append(Row("OK" if hit else "MISSING", f"{m.why}: {m.cls}.{m.member}",
                        _file(src, hit[0] if hit else m.module), m.optional))
    for why, module, name in vllm_api.MODULE_NAMES:
        hit = src.resolve(module, name)
        rows.append(Row("OK" if hit else "MISSING", f"{why}: {module}.{name}", _file(src, module)))
    return rows


def check_backends(src: VllmSource) -> list[Row]:
    """Each backend's `get_name()` string and the K/V split `layer_views` mirrors."""
    rows = []
    for name, (module, view) in vllm_api.KV_VIEWS.items():
        text = src.text(module)
        if text is None:
            rows.append(Row("MISSING", f"backend {name} (no module)", module, optional=True))
            continue
        named = f'return "{name}"' in text
        rows.append(Row("OK" if named else "CHANGED", f"backend {name}: get_name()",
                        _file(src, module)))
        rows.append(Row("OK" if view in text else "CHANGED", f"backend {name}: KV view `{view}`",
                        _file(src, module)))
    return rows


def _load_calls(tree: ast.Module) -> list[tuple[str, bool]]:
    """(enclosing function, passes keyword arguments) for each `.start_load_kv(...)` call."""
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for n in ast.walk(fn):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                    and n.func.attr == "start_load_kv" and fn.name != "start_load_kv":
                out.append((fn.name, bool(n.keywords)))
    return out


def check_load_order(src: VllmSource) -> list[Row]:
    """The blend runs inside `start_load_kv` and must precede the forward.

    Either the runner always starts loads before the forward, or it gates on
    `SchedulerOutput.has_sync_kv_loads`, which the scheduler must then set for requests
    with synchronous external tokens (ours). Whether the call passes `scheduler_output`
    decides only whether `guards.check_load_before_forward` can see the flag.
    """
    rows = []
    field = src.member("vllm.v1.core.sched.output", "SchedulerOutput", "has_sync_kv_loads")
    sets = "has_sync_kv_loads = True" in (src.text(vllm_api.SCHEDULER_MODULE) or "")
    for module in vllm_api.LOAD_CALLERS:
        text = src.text(module)
        if text is None:
            continue
        calls = _load_calls(src.tree(module))
        f = _file(src, module)
        where = ", ".join(sorted({c for c, _ in calls}))
        if "has_sync_kv_loads" not in text:
            rows.append(Row("OK", f"load order: start_load_kv in {where}, before the forward "
                            "(not gated)", f))
        elif field and sets:
            seen = "passes" if all(k for _, k in calls) else "does not pass"
            rows.append(Row("OK", f"load order: start_load_kv in {where}, before the forward "
                            "when has_sync_kv_loads, which the scheduler sets for sync loads; "
                            f"{seen} scheduler_output (our guard "
                            f"{'sees' if seen == 'passes' else 'cannot see'} the flag)", f))
        else:
            rows.append(Row("CHANGED", f"load order: gated on has_sync_kv_loads but the "
                            f"scheduler does not set it ({'field' if field else 'no field'})", f))
    return rows


def check(src: VllmSource, points: tuple[table.PatchPoint, ...] | None = None) -> list[Row]:
    """Every check for one vLLM source; `points` defaults to the table's set for its version."""
    if points is None:
        points = table.points_for(src.version, include_refused=True) or table.best_points_guess()
    return [*check_points(src, points), *check_connector_base(src), *check_imports(src),
            *check_members(src), *check_backends(src), *check_load_order(src)]


def _matching_set(src: VllmSource) -> str:
    fits = [name for name, pts in table.POINT_SETS.items()
            if not any(r.bad for r in check_points(src, pts))]
    return ", ".join(fits) if fits else "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blend.patches.check_wheel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheels", nargs="+", help="vLLM wheel files or folders holding vllm/")
    args = ap.parse_args(argv)
    failed = False
    for w in args.wheels:
        src = VllmSource(w)
        key = table.version_key(src.version)
        print(f"=== vLLM {src.version} ({Path(w).name}); table: {table.status_of(key)}; "
              f"patch-point sets that fit: {_matching_set(src)}")
        rows = check(src)
        for r in rows:
            print(r.line())
        bad = [r for r in rows if r.bad]
        opt = [r for r in rows if r.optional and r.status != "OK"]
        ok = len(rows) - len(bad) - len(opt)
        print(f"--- {ok} of {len(rows)} OK" + (f", {len(opt)} optional not OK" if opt else "")
              + (f"; {len(bad)} required not OK" if bad else ""))
        failed |= bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
