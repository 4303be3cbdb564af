"""Random paged caches and selections for the kernel tests and benchmarks (not used at run time)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def paged_cache(num_tokens: Sequence[int], block_size: int, heads: int, dim: int,
                dtype: torch.dtype, device: str | torch.device, heads_first: bool = False,
                spare_blocks: int = 3, gen: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, block_table) for requests of `num_tokens` tokens, blocks shuffled.

    `heads_first` lays the storage out as vLLM's CPU cache does (`[NB, H, BS, D]`)
    and returns the `[NB, BS, H, D]` view of it, which is then strided.
    """
    per = [max(1, -(-n // block_size)) for n in num_tokens]
    nb = sum(per) + spare_blocks
    shape = (nb, heads, block_size, dim) if heads_first else (nb, block_size, heads, dim)

    def one() -> torch.Tensor:
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)
        return x.transpose(1, 2) if heads_first else x

    perm = torch.randperm(nb, generator=gen)
    table = torch.zeros(len(num_tokens), max(per), dtype=torch.int32)
    i = 0
    for b, p in enumerate(per):
        table[b, :p] = perm[i:i + p]
        i += p
    return one(), one(), table.to(device)


def slots_of(table: torch.Tensor, block_size: int, req: int, positions: torch.Tensor) -> torch.Tensor:
    """Slots of request `req`'s tokens at `positions`."""
    pos = positions.long().to(table.device)
    return table[req].long()[pos // block_size] * block_size + pos % block_size


def sorted_positions(length: int, count: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """`count` distinct random positions in `[0, length)`, ascending."""
    return torch.randperm(length, generator=gen)[:count].sort().values
