"""Attention-backend registry: which implementation of the blend ops to run.

`torch` is the plain-PyTorch reference path (SDPA with an explicit mask) used
on CPU and as ground truth; `triton` runs the kernels in `blend.triton_kernels`;
`flash` (opt-in) is `triton` with vLLM's FlashAttention 3 doing the unmasked
bulk of the attention (`blend.triton_kernels.flash`). Inside vLLM it was no
faster than `triton` (bench/notes/ttft_vllm_gpu.md), so `auto`
stays `triton` on CUDA. Every backend offers the same ops with the reference
signatures, so the blender never branches on the backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blend.log import get_logger

logger = get_logger("Blender")


@dataclass(frozen=True)
class BlendOps:
    name: str
    attention: Callable  # selected_attention(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens, scale)
    deviation: Callable  # token_deviation(k_new, v_new, k_cache, v_cache, slots, metric)
    select: Callable     # hkvd_select(dev, forced, cu_tokens, num_take)
    fuse_kv: Callable    # fuse_kv(k_cache, v_cache, slots, k_new, v_new)
    rerotate_k: Callable  # rerotate_k(k_cache, slots, delta, cos_sin, is_neox)
    # attention where each request's queries are all its last positions (a causal prefill):
    # same arguments; None = `attention` serves that case too.
    attention_dense: Callable | None = None

    def attend(self, dense: bool) -> Callable:
        return self.attention_dense if dense and self.attention_dense else self.attention


def _torch_ops() -> BlendOps:
    from blend.triton_kernels import attention, deviation, kv_fusion, rope

    return BlendOps("torch", attention.selected_attention_ref, deviation.token_deviation_ref,
                    deviation.hkvd_select, kv_fusion.fuse_kv_ref, rope.rerotate_k_ref)


def _triton_ops() -> BlendOps:
    from blend.triton_kernels import attention, deviation, kv_fusion, rope

    return BlendOps("triton", attention.selected_attention, deviation.token_deviation,
                    deviation.hkvd_select, kv_fusion.fuse_kv, rope.rerotate_k)


def _flash_ops() -> BlendOps:
    from blend.triton_kernels import deviation, flash, kv_fusion, rope

    return BlendOps("flash", flash.flash_selected_attention, deviation.token_deviation,
                    deviation.hkvd_select, kv_fusion.fuse_kv, rope.rerotate_k,
                    attention_dense=flash.flash_dense_attention)


_BACKENDS: dict[str, Callable[[], BlendOps]] = {"torch": _torch_ops, "triton": _triton_ops,
                                                "flash": _flash_ops}
_cache: dict[str, BlendOps] = {}


def register_backend(name: str, factory: Callable[[], BlendOps]) -> None:
    _BACKENDS[name] = factory
    _cache.pop(name, None)


def available() -> list[str]:
    return sorted(_BACKENDS)


def get_ops(name: str = "auto", device: torch.device | str | None = None) -> BlendOps:
    """Resolve a backend name; `auto` is triton on CUDA (if it imports), torch elsewhere.
    `flash` without FA3 runs as triton."""
    if name == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        name = "triton" if on_cuda and _triton_importable() else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend {name!r} not in {available()}")
    if name not in _cache:
        _cache[name] = _BACKENDS[name]()
    return _cache[name]


def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        mod = importlib.import_module("blend.triton_kernels.attention")
        return hasattr(mod, "selected_attention")
    except Exception as exc:  # a broken triton must not take serving down
        logger.warning("triton backend unavailable (%s); using torch", exc)
        return False
