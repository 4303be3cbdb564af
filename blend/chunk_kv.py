"""Chunk KV: each chunk computed alone from position 0 (placing it: `chunk_placement.py`).

The stored value is `[num_layers, 2, n, Hkv, D]`: K (after RoPE at positions
0..n-1) and V of the chunk computed with nothing before it, which is how
CacheBlend defines chunk KV. Storing K after RoPE lets a vLLM worker save a
chunk straight from its paged cache; placing it at offset d is then one pure
rotation by d (see `triton_kernels/rope.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blend.blender import Blender, BlendSeq
from blend.kv import PagedKV, slots_for
from blend.triton_kernels.paged import to_device


@torch.inference_mode()
def compute_chunk_kv(blender: Blender, token_ids: Sequence[int]) -> torch.Tensor:
    """Standalone KV of one chunk, `[L, 2, n, Hkv, D]` in the model's dtype."""
    a = blender.adapter
    n = len(token_ids)
    kv = PagedKV.like(a, n)
    row = kv.allocate(n)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    blender.run([BlendSeq(ids, 0, row)], kv, blend=False)
    slots = to_device(slots_for(row, torch.arange(n), kv.block_size), torch.device(a.device))
    return read_kv(kv, slots)


def read_kv(kv, slots: torch.Tensor) -> torch.Tensor:
    """Gather the K/V at `slots` from every layer of a paged cache -> `[L, 2, n, Hkv, D]`."""
    bs = kv.block_size
    blk, off = slots // bs, slots % bs
    layers = [torch.stack((k[blk, off], v[blk, off])) for k, v in (kv.layer(i) for i in range(len(kv.k)))]
    return torch.stack(layers)
