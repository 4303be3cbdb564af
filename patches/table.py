"""Which vLLM internals we patch, per vLLM version.

Every patch point names the module it lives in, so a patch is applied the
moment that module is imported (see `hooks.py`) and never forces an import of
a heavy vLLM module into a process that does not need it. A vLLM version
that is not in `SUPPORTED` gets no patches at all and a message naming the
supported versions: patching internals we have not read is how silent
wrong-output bugs start.
"""

from __future__ import annotations

from dataclasses import dataclass

# major.minor of vLLM -> the release we checked the patch points against.
SUPPORTED: dict[str, str] = {
    "0.26": "0.26.0 (GPU build for torch 2.11, run on the H200)",
    "0.32": "0.32.0 (CPU build, run in CI)",
    "0.33": "0.33.0 (GPU build for torch 2.14, run on the H200)",
}


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
# 0.26: the same mixin and method, one module up (`entrypoints/offline_utils.py`); the GPU
# V2 runner is the default there (`v1/worker/gpu/model_runner.py`).
_V026 = (_REGISTER, *_RUNNERS_V1, *_RUNNERS_V2, _prompt_spans("vllm.entrypoints.offline_utils"))

TABLE: dict[str, tuple[PatchPoint, ...]] = {"0.26": _V026, "0.32": _COMMON, "0.33": _COMMON}


def version_key(version: str) -> str:
    """'0.32.0+cpu' -> '0.32'."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def points_for(version: str) -> tuple[PatchPoint, ...] | None:
    """Patch points for this vLLM version, or None when it is unsupported."""
    return TABLE.get(version_key(version))


def unsupported_message(version: str) -> str:
    listed = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
    return (
        f"cacheblend does not support vLLM {version}: its patch points were checked "
        f"against vLLM {listed} only. Install one of those versions, or set "
        f"BLEND_DISABLE_PATCHES=1 to run vLLM without cacheblend."
    )
