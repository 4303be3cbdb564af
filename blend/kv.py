"""A paged KV cache for the offline path, in the same layout vLLM's cache is viewed in.

The blender only knows paged caches (`[num_blocks, block_size, Hkv, D]` K and V
per layer plus block tables), so the `transformers` path and the vLLM path run
the same code. Offline, each sequence simply gets consecutive blocks.
"""

from __future__ import annotations

import torch


class PagedKV:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._next = 0

    @classmethod
    def like(cls, adapter, num_tokens: int, block_size: int = 16) -> PagedKV:
        """A cache with room for `num_tokens` tokens of `adapter`'s model."""
        blocks = -(-max(num_tokens, 1) // block_size)
        return cls(adapter.num_layers, blocks, block_size, adapter.num_kv_heads,
                   adapter.head_dim, adapter.dtype, adapter.device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def allocate(self, num_tokens: int) -> torch.Tensor:
        """Block-table row (int32, host memory: it is metadata) for up to `num_tokens` tokens."""
        n = -(-max(num_tokens, 1) // self.block_size)
        if self._next + n > self.num_blocks:
            raise MemoryError(f"PagedKV: {n} blocks requested, {self.num_blocks - self._next} free")
        row = torch.arange(self._next, self._next + n, dtype=torch.int32)
        self._next += n
        return row


def slots_for(block_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot (`block * block_size + offset`) of each position of one sequence, int64."""
    positions = positions.long()
    return block_row.long()[positions // block_size] * block_size + positions % block_size
