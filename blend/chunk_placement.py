"""Stored chunk KV put into a sequence's paged cache at any offset, layer by layer.

The offline blender's and the worker warm-up's way into the connector's own loader,
`chunk_loader.LayerLoad`, so they run (and their tests check) the copies and the RoPE
re-rotation the connector runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from blend.blender import Blender


@dataclass
class ChunkPlacement:
    """One chunk's KV going to `slots` of a sequence, moved by `delta` positions."""

    kv: torch.Tensor  # [L, 2, n, Hkv, D]
    slots: torch.Tensor  # [n] int64 on the cache's device
    delta: int


def _layer_load(blender: Blender, kv, placements: Sequence[ChunkPlacement]):
    from blend.chunk_loader import LayerLoad, Piece, source_for

    dev = torch.device(blender.adapter.device)
    pieces = [Piece(source_for("", p.kv, dev, None, False)[0], 0, int(p.kv.shape[2]), p.slots,
                    p.delta) for p in placements]
    return LayerLoad(blender, kv, pieces)


def load_all(blender: Blender, kv, placements: Sequence[ChunkPlacement]) -> None:
    """Place every layer of every chunk now (a reuse run that computes no context)."""
    load = _layer_load(blender, kv, placements)
    for layer in range(blender.adapter.num_layers):
        load.hook(layer)


def layer_loader(blender: Blender, kv, placements: Sequence[ChunkPlacement]) -> Callable[[int], None]:
    """A `layer_hook` that places each layer's chunk KV just before the blend reads it
    (`blend.chunk_loader.LayerLoad`: the connector's loader, with device-resident chunks)."""
    return _layer_load(blender, kv, placements).hook
