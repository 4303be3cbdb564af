"""RoPE re-rotation of cached K, in place.

Chunk K is stored after RoPE at positions 0..n-1. Moving a chunk to offset d
multiplies each rotary pair by the pure rotation R(d * inv_freq). That is
exact for every RoPE variant whose angle is linear in the position (default,
linear, Llama-3 and YaRN scaling: they only change `inv_freq`); YaRN's mscale
is a scalar already folded into the stored K, so the delta table must hold
pure cos/sin with no mscale (composing the model's own table would square it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged import INTERPRET, split_slots


def delta_cos_sin(inv_freq: torch.Tensor, max_delta: int) -> torch.Tensor:
    """`[max_delta + 1, 2, rotary_dim // 2]` fp32 table of cos/sin(d * inv_freq), built in fp64."""
    d = torch.arange(max_delta + 1, dtype=torch.float64, device=inv_freq.device)
    ang = d[:, None] * inv_freq.double()[None, :]
    return torch.stack((ang.cos(), ang.sin()), dim=1).float()


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Apply the rotation to the rotary part of `x` `[N, H, rot]`; cos/sin are `[N, rot // 2]`."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:  # GPT-J: interleaved pairs
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def rerotate_k_ref(
    k_cache: torch.Tensor,
    slots: torch.Tensor,
    delta: torch.Tensor,
    cos_sin: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Rotate the K at `slots` by `delta[i]` positions, in place, in fp32.

    `k_cache` is `[num_blocks, block_size, H, D]` (any strides); `cos_sin` comes
    from `delta_cos_sin`; its width sets the rotary dim (partial rotary keeps
    the remaining dims of each head unchanged).
    """
    if slots.numel() == 0:
        return
    blk, off = split_slots(slots, k_cache.shape[1])
    rot = cos_sin.shape[-1] * 2
    k = k_cache[blk, off].float()
    cs = cos_sin[delta.long()]
    k[..., :rot] = rotate_ref(k[..., :rot], cs[:, 0], cs[:, 1], is_neox)
    k_cache[blk, off] = k.to(k_cache.dtype)


# One program rotates BLOCK_T tokens x all heads at once, (head, pair) flattened
# into one axis so all loads are issued before the first store. Only the rotary
# dims are read and written; with partial rotary the rest of a head is untouched.
@triton.jit(do_not_specialize=["n"])  # sizes vary per run: no recompiles
def _rerotate_k_kernel(
    K, SLOTS, DELTA, CS, n, block_size,
    s_kb, s_ko, s_kh, s_kd, s_cs0, s_cs1,
    H: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, E_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    slot = tl.load(SLOTS + t, mask=t_ok, other=0).to(tl.int64)
    row = (slot // block_size) * s_kb + (slot % block_size) * s_ko
    dl = tl.load(DELTA + t, mask=t_ok, other=0).to(tl.int64)
    e = tl.arange(0, E_PAD)
    h = e // HALF_PAD
    i = e % HALF_PAD
    m = t_ok[:, None] & ((h < H) & (i < HALF))[None, :]
    cs = CS + dl[:, None] * s_cs0 + i[None, :]
    cos = tl.load(cs, mask=m, other=1.0)
    sin = tl.load(cs + s_cs1, mask=m, other=0.0)
    base = K + row[:, None] + (h * s_kh)[None, :]
    if IS_NEOX:
        p1 = base + (i * s_kd)[None, :]
        p2 = base + ((i + HALF) * s_kd)[None, :]
        x1 = tl.load(p1, mask=m).to(tl.float32)
        x2 = tl.load(p2, mask=m).to(tl.float32)
        tl.store(p1, (x1 * cos - x2 * sin).to(K.dtype.element_ty), mask=m)
        tl.store(p2, (x2 * cos + x1 * sin).to(K.dtype.element_ty), mask=m)
    else:  # GPT-J: interleaved pairs, loaded as one contiguous [.., pair, 2] block and split
        two = tl.arange(0, 2)
        p = base[:, :, None] + ((2 * i)[None, :, None] + two[None, None, :]) * s_kd
        m3 = m[:, :, None] & (two < 2)[None, None, :]
        x1, x2 = tl.split(tl.load(p, mask=m3).to(tl.float32))
        out = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        tl.store(p, out.to(K.dtype.element_ty), mask=m3)


def rerotate_k(
    k_cache: torch.Tensor,
    slots: torch.Tensor,
    delta: torch.Tensor,
    cos_sin: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Triton version of `rerotate_k_ref`: rotate K at `slots` by `delta[i]`, in place, no sync."""
    n = slots.numel()
    if n == 0:
        return
    h = k_cache.shape[2]
    half = cos_sin.shape[-1]
    half_pad = triton.next_power_of_2(half)
    e_pad = triton.next_power_of_2(h * half_pad)
    cs = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
    block_t = 4 if INTERPRET else max(1, min(64, 4096 // e_pad))
    _rerotate_k_kernel[(triton.cdiv(n, block_t),)](
        k_cache, slots, delta, cs, n, k_cache.shape[1],
        *k_cache.stride(), cs.stride(0), cs.stride(1),
        H=h, HALF=half, HALF_PAD=half_pad, E_PAD=e_pad, IS_NEOX=is_neox,
        BLOCK_T=block_t, num_warps=4,
    )
