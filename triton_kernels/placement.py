"""Chunk placement: write every piece of chunk KV into the paged cache, K re-rotated, in one launch.

A blend run places up to dozens of pieces (one per chunk and sequence), each
from its own source tensor `[L, 2, n, H, D]`, moved from positions `0..n-1`
to where the chunk sits. `fuse_kv` then `rerotate_k` per piece costs
`2 * pieces` launches per layer; this kernel does one launch for any set of
layers (all of them when the sources already sit on the GPU). Sources and
caches are addressed as element offsets from one base tensor, so one kernel
serves sources of different lengths in different allocations.

The result is bit-identical to `place_chunks_ref` (fuse, then rotate the
cached K in fp32): V is copied, K's rotary pairs are rotated by `delta`, the
rest of each K head is copied.

`extract` runs the same kernel backwards, to save a chunk's KV out of a
prompt: the pieces' rows are read from the cache into the sources, K rotated
back by `delta` to positions `0..n-1` (`extract_chunks_ref`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .kv_fusion import fuse_kv_ref
from .paged import INTERPRET, split_slots, to_device
from .rope import rerotate_k_ref, rotate_ref


@dataclass
class PlacePiece:
    """Rows `[lo, hi)` of `src` (`[L, 2, n, H, D]`) go to `slots`, moved by `delta` positions."""

    src: torch.Tensor
    lo: int
    hi: int
    slots: torch.Tensor  # [hi - lo] int, host or device
    delta: int


def place_chunks_ref(caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     pieces: Sequence[PlacePiece], layers: Sequence[int],
                     cos_sin: torch.Tensor, is_neox: bool = True) -> None:
    """The reference: for each layer, fuse each piece's K/V, then re-rotate its K by `delta`."""
    for layer in layers:
        k_cache, v_cache = caches[layer]
        for p in pieces:
            slots = p.slots.to(k_cache.device)
            kv = p.src[layer]
            fuse_kv_ref(k_cache, v_cache, slots, kv[0, p.lo:p.hi], kv[1, p.lo:p.hi])
            if p.delta:
                delta = torch.full((p.hi - p.lo,), p.delta, dtype=torch.int32,
                                   device=k_cache.device)
                rerotate_k_ref(k_cache, slots, delta, cos_sin, is_neox)


def extract_chunks_ref(caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       pieces: Sequence[PlacePiece], layers: Sequence[int],
                       cos_sin: torch.Tensor, is_neox: bool = True) -> None:
    """The inverse: rows `[lo, hi)` of each source get the cache's K/V at `slots`, K rotated
    back by `delta` positions in fp32 (so a chunk at position `delta` is stored at 0)."""
    rot = cos_sin.shape[-1] * 2
    for layer in layers:
        k_cache, v_cache = caches[layer]
        for p in pieces:
            blk, off = split_slots(p.slots.to(k_cache.device), k_cache.shape[1])
            k = k_cache[blk, off].float()
            cs = cos_sin[p.delta].expand(p.hi - p.lo, 2, -1)
            k[..., :rot] = rotate_ref(k[..., :rot], cs[:, 0], -cs[:, 1], is_neox)
            p.src[layer, 0, p.lo:p.hi] = k.to(p.src.dtype)
            p.src[layer, 1, p.lo:p.hi] = v_cache[blk, off].to(p.src.dtype)


class Placement:
    """One run's placement metadata on the device (one pinned copy); `place(layers)` launches."""

    def __init__(self, caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 pieces: Sequence[PlacePiece], cos_sin: torch.Tensor, is_neox: bool) -> None:
        k0 = caches[0][0]
        self.base, self.caches = k0, caches
        self.n = sum(p.hi - p.lo for p in pieces)
        self.num_layers = len(caches)
        _, self.block_size, self.h, self.d = k0.shape
        strides = {(k.stride(), v.stride()) for k, v in caches}
        if len(strides) != 1 or k0.stride() != caches[0][1].stride():
            raise ValueError("placement: every layer's K and V caches must share one stride layout")
        for p in pieces:
            if not p.src.is_contiguous() or p.src.dtype != k0.dtype or p.src.device != k0.device:
                raise ValueError("placement: sources must be contiguous, on the cache's device, "
                                 "in the cache's dtype")
        self.cs = cos_sin if cos_sin.stride(-1) == 1 else cos_sin.contiguous()
        self.is_neox = is_neox
        self.meta = None
        if self.n == 0:
            return
        esz = k0.element_size()
        base = k0.data_ptr()
        hd = self.h * self.d

        def off(t: torch.Tensor) -> int:
            return (t.data_ptr() - base) // esz

        # Per piece: its source's offset, strides and delta, repeated over its rows (one
        # numpy pass, not four small tensor ops per piece: dozens of pieces per run).
        m = np.array([p.hi - p.lo for p in pieces], dtype=np.int64)
        n_src = np.array([p.src.shape[2] for p in pieces], dtype=np.int64)
        first = np.array([off(p.src) + p.lo * hd for p in pieces], dtype=np.int64)
        starts = np.cumsum(m) - m
        within = np.arange(self.n, dtype=np.int64) - np.repeat(starts, m)
        rows = np.repeat(first, m) + within * hd
        lstride = np.repeat(2 * n_src * hd, m)
        vstride = np.repeat(n_src * hd, m)
        delta = np.repeat(np.array([p.delta for p in pieces], dtype=np.int64), m)
        slots = torch.cat([p.slots.cpu().to(torch.int64) for p in pieces]).numpy()
        layer_off = np.array([off(k) for k, _ in caches] + [off(v) for _, v in caches],
                             dtype=np.int64)
        host = torch.from_numpy(np.concatenate([rows, lstride, vstride, slots, delta, layer_off]))
        self.meta = to_device(host, k0.device)

    def place(self, layers: range) -> None:
        """Write every piece into the caches of `layers` (a contiguous range), no sync."""
        self._launch(layers, extract=False)

    def extract(self, layers: range) -> None:
        """Read every piece back out of the caches of `layers` into its source, no sync."""
        self._launch(layers, extract=True)

    def _launch(self, layers: range, extract: bool) -> None:
        if self.n == 0 or len(layers) == 0:
            return
        k0 = self.base
        half = self.cs.shape[-1]
        half_pad = triton.next_power_of_2(half)
        hd_pad = triton.next_power_of_2(self.h * self.d)
        e_pad = triton.next_power_of_2(self.h * half_pad)
        block_t = 4 if INTERPRET else max(1, min(32, 4096 // hd_pad))
        _place_kernel[(triton.cdiv(self.n, block_t), len(layers))](
            k0, self.meta, self.cs, self.n, layers.start, self.num_layers, self.block_size,
            *k0.stride(), self.cs.stride(0), self.cs.stride(1),
            H=self.h, HEAD_DIM=self.d, HD_PAD=hd_pad, HALF=half, HALF_PAD=half_pad,
            E_PAD=e_pad, IS_NEOX=self.is_neox, EXTRACT=extract, BLOCK_T=block_t, num_warps=4,
        )


# One program places BLOCK_T tokens of one layer: V and K's non-rotary dims are copied over
# (head, dim) flattened; K's rotary pairs are rotated in fp32 over (head, pair) flattened.
# Offsets are int64 elements from BASE: sources and caches are separate allocations.
@triton.jit(do_not_specialize=["n", "layer0"])
def _place_kernel(
    BASE, META, CS, n, layer0, num_layers, block_size,
    s_kb, s_ko, s_kh, s_kd, s_cs0, s_cs1,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, E_PAD: tl.constexpr, IS_NEOX: tl.constexpr, EXTRACT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    layer = layer0 + tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    row = tl.load(META + t, mask=t_ok, other=0)
    lstride = tl.load(META + n + t, mask=t_ok, other=0)
    vstride = tl.load(META + 2 * n + t, mask=t_ok, other=0)
    slot = tl.load(META + 3 * n + t, mask=t_ok, other=0)
    dl = tl.load(META + 4 * n + t, mask=t_ok, other=0)
    k_off = tl.load(META + 5 * n + layer)
    v_off = tl.load(META + 5 * n + num_layers + layer)
    src_k = row + layer.to(tl.int64) * lstride  # [BLOCK_T] element offsets of the K rows
    src_v = src_k + vstride
    dst = (slot // block_size) * s_kb + (slot % block_size) * s_ko

    # V, and K outside the rotary dims: plain copies (cache -> source when EXTRACT).
    e = tl.arange(0, HD_PAD)
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    m = t_ok[:, None] & (e < H * HEAD_DIM)[None, :]
    dst_hd = dst[:, None] + (h * s_kh + d * s_kd)[None, :]
    m_pass = m & (d >= 2 * HALF)[None, :]
    if EXTRACT:
        v = tl.load(BASE + v_off + dst_hd, mask=m)
        tl.store(BASE + src_v[:, None] + e[None, :], v, mask=m)
        kp = tl.load(BASE + k_off + dst_hd, mask=m_pass)
        tl.store(BASE + src_k[:, None] + e[None, :], kp, mask=m_pass)
    else:
        v = tl.load(BASE + src_v[:, None] + e[None, :], mask=m)
        tl.store(BASE + v_off + dst_hd, v, mask=m)
        kp = tl.load(BASE + src_k[:, None] + e[None, :], mask=m_pass)
        tl.store(BASE + k_off + dst_hd, kp, mask=m_pass)

    # K's rotary pairs, rotated by delta positions (by -delta when EXTRACT).
    f = tl.arange(0, E_PAD)
    fh = f // HALF_PAD
    i = f % HALF_PAD
    mr = t_ok[:, None] & ((fh < H) & (i < HALF))[None, :]
    cs = CS + dl[:, None] * s_cs0 + i[None, :]
    cos = tl.load(cs, mask=mr, other=1.0)
    sin = tl.load(cs + s_cs1, mask=mr, other=0.0)
    row_src = BASE + src_k[:, None] + (fh * HEAD_DIM)[None, :]  # dims at stride 1
    row_dst = BASE + k_off + dst[:, None] + (fh * s_kh)[None, :]  # dims at stride s_kd
    if EXTRACT:
        sin = -sin
        inp, s_in, outp, s_out = row_dst, s_kd, row_src, 1
    else:
        inp, s_in, outp, s_out = row_src, 1, row_dst, s_kd
    if IS_NEOX:
        a = i
        b = i + HALF
    else:  # GPT-J: interleaved pairs
        a = 2 * i
        b = 2 * i + 1
    x1 = tl.load(inp + (a * s_in)[None, :], mask=mr).to(tl.float32)
    x2 = tl.load(inp + (b * s_in)[None, :], mask=mr).to(tl.float32)
    tl.store(outp + (a * s_out)[None, :], (x1 * cos - x2 * sin).to(BASE.dtype.element_ty),
             mask=mr)
    tl.store(outp + (b * s_out)[None, :], (x2 * cos + x1 * sin).to(BASE.dtype.element_ty),
             mask=mr)
