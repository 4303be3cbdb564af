"""Chunk KV: each chunk computed alone from position 0, and placed anywhere later.

The stored value is `[num_layers, 2, n, Hkv, D]`: K (after RoPE at positions
0..n-1) and V of the chunk computed with nothing before it, which is how
CacheBlend defines chunk KV. Storing K after RoPE lets a vLLM worker save a
chunk straight from its paged cache; placing it at offset d is then one pure
rotation by d (see `triton_kernels/rope.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from blend.blender import Blender, BlendSeq
from blend.kv import PagedKV, slots_for


@dataclass
class Placement:
    """One chunk's KV going to `slots` of a sequence, moved by `delta` positions."""

    kv: torch.Tensor  # [L, 2, n, Hkv, D]
    slots: torch.Tensor  # [n] int64 on the cache's device
    delta: int


@torch.inference_mode()
def compute_chunk_kv(blender: Blender, token_ids: Sequence[int]) -> torch.Tensor:
    """Standalone KV of one chunk, `[L, 2, n, Hkv, D]` in the model's dtype."""
    a = blender.adapter
    n = len(token_ids)
    kv = PagedKV.like(a, n)
    row = kv.allocate(n)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    blender.run([BlendSeq(ids, 0, row)], kv, blend=False)
    slots = slots_for(row.to(a.device), torch.arange(n, device=a.device), kv.block_size)
    return read_kv(kv, slots)


def read_kv(kv, slots: torch.Tensor) -> torch.Tensor:
    """Gather the K/V at `slots` from every layer of a paged cache -> `[L, 2, n, Hkv, D]`."""
    bs = kv.block_size
    blk, off = slots // bs, slots % bs
    layers = [torch.stack((k[blk, off], v[blk, off])) for k, v in (kv.layer(i) for i in range(len(kv.k)))]
    return torch.stack(layers)


def load_layer(blender: Blender, kv, layer: int, placements: Sequence[Placement]) -> None:
    """Write one layer of each placed chunk into the cache and re-rotate its K in place."""
    if not placements:
        return
    ops = blender.ops
    k_cache, v_cache = kv.layer(layer)
    slots = torch.cat([p.slots for p in placements])
    k = torch.cat([p.kv[layer, 0] for p in placements]).to(k_cache.device, non_blocking=True)
    v = torch.cat([p.kv[layer, 1] for p in placements]).to(v_cache.device, non_blocking=True)
    ops.fuse_kv(k_cache, v_cache, slots, k, v)
    deltas = [p.delta for p in placements]
    if any(deltas):
        delta = torch.cat([torch.full((p.slots.numel(),), p.delta, dtype=torch.int32)
                           for p in placements]).to(k_cache.device, non_blocking=True)
        ops.rerotate_k(k_cache, slots, delta, blender.delta_table(max(deltas)),
                       blender.adapter.rope.is_neox)


def load_all(blender: Blender, kv, placements: Sequence[Placement]) -> None:
    for layer in range(blender.adapter.num_layers):
        load_layer(blender, kv, layer, placements)


def layer_loader(blender: Blender, kv, placements: Sequence[Placement]) -> Callable[[int], None]:
    """A `layer_hook` that loads each layer's chunk KV just before the blend reads it."""
    return lambda layer: load_layer(blender, kv, layer, placements)
