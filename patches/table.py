"""Which vLLM internals we patch, per vLLM version.

Every patch point names the module it lives in, so a patch is applied the
moment that module is imported (see `hooks.py`) and never forces an import of
a heavy vLLM module into a process that does not need it. A vLLM version
that is not in `SUPPORTED` (run, or checked in its wheel) gets no patches at
all and a message saying why: patching internals we have not read is how
silent wrong-output bugs start. A checked version that was never run starts
with a warning naming `cacheblend verify --model PATH`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The declared range (inclusive, major.minor): `setup.py`'s `vllm` extra and docs/support.md
# say the same. Outside it, every version is refused. Inside it, each minor is one of:
RANGE = ("0.26", "0.33")
# run: the connector ran inside that vLLM (GPU suite or CI); starts silently.
RUN: dict[str, str] = {
    "0.26": "0.26.0 (GPU build for torch 2.11, run on the H200)",
    "0.32": "0.32.0 (CPU build, run in CI)",
    "0.33": "0.33.0 (GPU build for torch 2.14, run on the H200)",
}
# checked: every patch point and API we rely on read in that release's wheel
# (`python -m blend.patches.check_wheel`, bench/results/vllm_wheels_check.txt), never run;
# starts with a warning that asks for `cacheblend verify --model PATH`.
CHECKED: dict[str, str] = {
    "0.27": "0.27.1 GPU wheel",
    "0.28": "0.28.0 GPU wheel",
    "0.29": "0.29.0 GPU wheel",
    "0.30": "0.30.0 GPU wheel",
    "0.31": "0.31.0 GPU wheel",
}
# refused: read in the wheel and found to differ in a way the code does not handle.
REFUSED: dict[str, str] = {}

@dataclass(frozen=True)
class PatchPoint:
    """One place in vLLM we touch: `module.qualname` gets `kind` applied."""

    name: str  # stable id, shown by `cacheblend verify`
    module: str  # module whose import triggers the patch
    target: str  # attribute path inside the module ("Class.method" or "Class")
    kind: str  # "register" | "capture" | "prompt_spans"
    optional: bool = False  # absent in some builds (e.g. the V2 runners); not an error


_RUNNERS_V1 = (
    PatchPoint("model capture", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", "capture"),
    PatchPoint("model capture", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "capture"),
)
_RUNNERS_V2 = (
    PatchPoint("model capture", "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.load_model", "capture", optional=True),
    PatchPoint("model capture", "vllm.v1.worker.cpu.model_runner", "CPUModelRunner.load_model", "capture", optional=True),
)
_REGISTER = PatchPoint("connector registered", "vllm.distributed.kv_transfer.kv_connector.factory",
                       "KVConnectorFactory", "register")


def _prompt_spans(module: str) -> PatchPoint:
    return PatchPoint("prompt spans", module, "OfflineInferenceMixin._add_completion_requests",
                      "prompt_spans")


_COMMON = (_REGISTER, *_RUNNERS_V1, *_RUNNERS_V2, _prompt_spans("vllm.entrypoints.common.offline"))
# 0.26-0.31: the same mixin and method, one module up (`entrypoints/offline_utils.py`, read in
# each wheel); the GPU V2 runner is the default there (`v1/worker/gpu/model_runner.py`).
_V026 = (_REGISTER, *_RUNNERS_V1, *_RUNNERS_V2, _prompt_spans("vllm.entrypoints.offline_utils"))

# Named for the checker, which reports which set a release's source fits.
POINT_SETS: dict[str, tuple[PatchPoint, ...]] = {
    "entrypoints.offline_utils (0.26-0.31)": _V026,
    "entrypoints.common.offline (0.32-)": _COMMON,
}
# Patch points per minor in the range, refused ones included (so the checker can re-read them).
POINTS: dict[str, tuple[PatchPoint, ...]] = {
    "0.26": _V026, "0.27": _V026, "0.28": _V026, "0.29": _V026, "0.30": _V026, "0.31": _V026,
    "0.32": _COMMON, "0.33": _COMMON,
}


def version_key(version: str) -> str:
    """'0.32.0+cpu' -> '0.32'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def _num(key: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in key.split("."))
    except ValueError:
        return (-1,)


SUPPORTED: dict[str, str] = dict(sorted({**RUN, **CHECKED}.items(), key=lambda kv: _num(kv[0])))
TABLE: dict[str, tuple[PatchPoint, ...]] = {k: POINTS[k] for k in SUPPORTED}


def in_range(version: str) -> bool:
    return _num(RANGE[0]) <= _num(version_key(version)) <= _num(RANGE[1])


def points_for(version: str, include_refused: bool = False) -> tuple[PatchPoint, ...] | None:
    """Patch points for this vLLM version, or None when it is refused."""
    key = version_key(version)
    return POINTS.get(key) if include_refused else TABLE.get(key)


def best_points_guess() -> tuple[PatchPoint, ...]:
    """For a release outside the table (the checker reads it anyway): the newest set."""
    return POINTS[max(POINTS, key=_num)]


def status_of(key: str) -> str:
    """One phrase: how this minor stands ('run: ...', 'checked: ...', 'refused: ...')."""
    for label, table in (("run", RUN), ("checked", CHECKED), ("refused", REFUSED)):
        if key in table:
            return f"{label}: {table[key]}"
    return "outside the supported range " + "-".join(RANGE) if not in_range(key) else "not listed"


def unrun_warning(version: str) -> str | None:
    """The start-up warning for a version that was checked in its wheel but never run."""
    key = version_key(version)
    if key not in CHECKED:
        return None
    return (f"cacheblend has not run on vLLM {version}: its patch points and the vLLM APIs "
            f"the connector uses were only read in the {CHECKED[key]} "
            "(python -m blend.patches.check_wheel). Run `cacheblend verify --model PATH` with "
            "your model before relying on its output.")


def _listed() -> str:
    return (f"run: {', '.join(RUN)}; checked in their wheels, not run: "
            f"{', '.join(CHECKED) or 'none'}")


def unsupported_message(version: str) -> str:
    key = version_key(version)
    if key in REFUSED:
        return (f"cacheblend refuses vLLM {version}: {REFUSED[key]}. Supported ({_listed()}). "
                "Set BLEND_DISABLE_PATCHES=1 to run vLLM without cacheblend.")
    return (f"cacheblend does not support vLLM {version}: it supports vLLM {RANGE[0]} to "
            f"{RANGE[1]} ({_listed()}). Install one of those, or set BLEND_DISABLE_PATCHES=1 "
            "to run vLLM without cacheblend.")
