"""The dtype a user would pick on this machine, shared by the demo, the benchmarks and tests.

On a GPU that is bf16. On a CPU it depends on the CPU (vLLM 0.32 CPU):

- **No native bf16** (neither AVX512-BF16 nor AMX-BF16): oneDNN cannot build a
  bf16 linear ("could not create a primitive descriptor"), vLLM falls back to
  emulated bf16, and prefill is several times slower than fp32 (SmolLM2, 1,019
  tokens: 15.9 s vs 2.4 s). fp32.
- **AVX512-BF16 without AMX**: bf16 runs natively and vLLM's CPU attention uses
  its strided `vec` KV layout. bf16.
- **AMX**: bf16 runs natively, but vLLM's CPU attention then picks its `amx` ISA
  (bf16, block size a multiple of 32), whose KV layout is not a strided view and
  which the connector refuses at start-up. For blending, fp32 (`vec` layout);
  plain vLLM without the connector would still take bf16.

`CACHEBLEND_DTYPE=float32|bfloat16|float16` (or an explicit argument) overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # a vLLM `dtype=` string
    reason: str  # one line, for the program's output

    def __str__(self) -> str:
        return f"dtype {self.dtype} ({self.reason})"


def cpu_bf16_features() -> dict[str, bool]:
    """Native bf16 features of this CPU: `avx512_bf16` and `amx` (AMX tiles, bf16)."""
    try:
        import torch

        return {"avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
                "amx": bool(torch.cpu._is_amx_tile_supported())}
    except (ImportError, AttributeError):  # torch without the probes: the kernel's view
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return {"avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags}


def choose_dtype(device: str = "cpu", override: str | None = None, blend: bool = True
                 ) -> DtypeChoice:
    """bf16 where it runs natively (and, with `blend`, the connector supports its KV layout),
    else fp32. `override` or $CACHEBLEND_DTYPE wins."""
    forced = override or os.environ.get("CACHEBLEND_DTYPE")
    if forced:
        if forced not in DTYPES:
            raise ValueError(f"dtype {forced!r}: allowed {', '.join(DTYPES)}")
        return DtypeChoice(forced, "set explicitly")
    if device != "cpu":
        return DtypeChoice("bfloat16", device)
    return decide_cpu_dtype(cpu_bf16_features(), blend)


def decide_cpu_dtype(f: dict[str, bool], blend: bool = True) -> DtypeChoice:
    """The CPU rule above, from `cpu_bf16_features()`."""
    if not (f["avx512_bf16"] or f["amx"]):
        return DtypeChoice("float32", "this CPU has no native bf16 (no avx512_bf16/amx_bf16): "
                                      "bf16 would be emulated, several times slower")
    if f["amx"] and blend:
        return DtypeChoice("float32", "this CPU has AMX: vLLM's bf16 CPU attention would use "
                                      "its 'amx' KV layout, which cacheblend does not support yet")
    return DtypeChoice("bfloat16", "this CPU has native bf16 (" +
                       ", ".join(k for k, v in f.items() if v) + ")")


def shutdown_llm(llm) -> None:
    """Stop a `vllm.LLM`'s engine processes now (vLLM 0.32's `LLM` has no `shutdown()`).

    Otherwise they stop when the object is collected, or at interpreter exit from a
    finalizer (SIGTERM, a 5 s wait, then SIGKILL) while the process is tearing down:
    a second engine started meanwhile shares the cores and memory with the first.
    """
    llm.llm_engine.engine_core.shutdown()
