"""KV fusion: scatter the fresh K/V of recomputed tokens over the cached K/V."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged import INTERPRET, split_slots


def fuse_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    """`cache[slot[i]] = new[i]` for K and V; `new` is `[N, H, D]`, caches `[NB, BS, H, D]`.
    A negative slot writes nowhere (padding rows, as vLLM's slot -1; the reference's filter
    syncs a CUDA device, the kernel's does not)."""
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k_new, v_new = slots[keep], k_new[keep], v_new[keep]
    if slots.numel() == 0:
        return
    blk, off = split_slots(slots, k_cache.shape[1])
    k_cache[blk, off] = k_new.to(k_cache.dtype)
    v_cache[blk, off] = v_new.to(v_cache.dtype)


# One program copies BLOCK_T tokens x all heads; the new K/V rows may be any
# strided view (e.g. slices of a fused qkv output) and the cache any paged view.
@triton.jit(do_not_specialize=["n"])  # sizes vary per run: no recompiles
def _fuse_kv_kernel(
    K, V, SLOTS, KN, VN, n, block_size,
    s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd,
    s_knt, s_knh, s_knd, s_vnt, s_vnh, s_vnd,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    slot = tl.load(SLOTS + t, mask=t_ok, other=-1).to(tl.int64)
    t_ok = t_ok & (slot >= 0)  # a negative slot (padding) writes nowhere
    slot = tl.maximum(slot, 0)
    blk = slot // block_size
    off = slot % block_size
    e = tl.arange(0, HD_PAD)  # (head, dim) flattened
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    m = t_ok[:, None] & (e < H * HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)[:, None]
    k = tl.load(KN + t64 * s_knt + h[None, :] * s_knh + d[None, :] * s_knd, mask=m)
    v = tl.load(VN + t64 * s_vnt + h[None, :] * s_vnh + d[None, :] * s_vnd, mask=m)
    tl.store(K + (blk * s_kb + off * s_ko)[:, None] + h[None, :] * s_kh + d[None, :] * s_kd,
             k.to(K.dtype.element_ty), mask=m)
    tl.store(V + (blk * s_vb + off * s_vo)[:, None] + h[None, :] * s_vh + d[None, :] * s_vd,
             v.to(V.dtype.element_ty), mask=m)


def fuse_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> None:
    """Triton version of `fuse_kv_ref`: `cache[slot[i]] = new[i]`, in place, no sync; a
    negative slot writes nowhere."""
    n = slots.numel()
    if n == 0:
        return
    _, _, h, dim = k_cache.shape
    hd_pad = triton.next_power_of_2(h * dim)
    block_t = max(1, min(64, 8192 // hd_pad)) if not INTERPRET else 4
    _fuse_kv_kernel[(triton.cdiv(n, block_t),)](
        k_cache, v_cache, slots, k_new, v_new, n, k_cache.shape[1],
        *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        H=h, HEAD_DIM=dim, HD_PAD=hd_pad, BLOCK_T=block_t, num_warps=4 if hd_pad <= 2048 else 8,
    )
