"""Chunk KV from the store's tiers into vLLM's paged cache, layer by layer, ahead of the blend.

The load sits on TTFT's critical path, so it is designed rather than left to
`.to(device)`:

* tiers: a byte-bounded GPU tier (`blend.store.gpu_tier`, no copy at all), then the
  store's pinned host tier, then disk or UCM (`ChunkStore.fetch`);
* each host-resident chunk gets a device buffer; its layer `l` is one async
  DMA from pinned memory on a side stream. The copies are queued at the first
  two layer hooks, after the blender has uploaded every small metadata tensor
  of the run (`Blender.run` preloads them): on the one host-to-device copy
  engine a small copy queued behind gigabytes of KV would stall its layer;
* on CUDA with the Triton ops, one `Placement` launch per layer writes every
  piece, K re-rotated on the way (all layers in one launch when no chunk needs
  a copy); elsewhere each piece is fused, then its K re-rotated;
* layer `l`'s placement waits on the event of copy `l` only, never on the
  whole load and never through a host sync;
* a host chunk's device buffer is offered to the GPU tier afterwards, so a
  recurring chunk's next load is a device-to-device placement.

On the CPU the fetched tensor is used in place: no copy either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blend.log import get_logger
from blend.store.gpu_tier import DeviceTier
from blend.triton_kernels.paged import to_device

log = get_logger("Connector")


@dataclass
class ChunkSource:
    """One chunk's KV `[L, 2, n, Hkv, D]` for this run: where copies read it, where fuses do."""

    key: str
    host: torch.Tensor | None  # pinned host tensor to copy from; None when already on the device
    dev: torch.Tensor  # device tensor the fuses read (the GPU tier's entry, or a fresh buffer)
    keep: bool = False  # offer `dev` to the GPU tier after the run


@dataclass
class Piece:
    """Tokens `[lo, hi)` of a source go to `slots` of a sequence, moved by `delta` positions."""

    src: ChunkSource
    lo: int
    hi: int
    slots: torch.Tensor  # [hi - lo] int64, host
    delta: int


class LayerLoad:
    """One blend run's chunk KV; `hook(l)` is the blender's `layer_hook`.

    `window` (layers) bounds how far copies run ahead of the blend; None queues
    the first two layers at the first hook and every other layer at the second.
    """

    def __init__(self, blender, kv, pieces: Sequence[Piece], window: int | None = None) -> None:
        self.b, self.kv, self.pieces = blender, kv, list(pieces)
        self.window = window
        dev = torch.device(blender.adapter.device)
        self.cuda = dev.type == "cuda"
        self.sources = list({id(p.src): p.src for p in self.pieces}.values())
        self.copies = [s for s in self.sources if s.host is not None]
        self.num_layers = blender.adapter.num_layers
        self.events: list[torch.cuda.Event | None] = [None] * self.num_layers
        self.groups = copy_groups(self.num_layers)
        self.issued = 0
        self.placed = 0  # layers [0, placed) are written
        self.placement = None
        self._rot = None
        self.slots: list[torch.Tensor] = []
        if self.pieces and blender.ops.name == "triton":
            self.placement = self._placement()
        if self.pieces and self.placement is None:  # one host-to-device copy for every piece's slots
            all_slots = to_device(torch.cat([p.slots for p in self.pieces]), dev)
            self.slots = list(all_slots.split([p.hi - p.lo for p in self.pieces]))
            if any(p.delta for p in self.pieces):
                delta = torch.cat([torch.full((p.hi - p.lo,), p.delta, dtype=torch.int32)
                                   for p in self.pieces])
                self._rot = (all_slots, to_device(delta, dev, torch.int32),
                             blender.delta_table(max(p.delta for p in self.pieces)))
        self.stream = torch.cuda.Stream(device=dev) if self.cuda and self.copies else None
        self.copy_start = self.copy_end = None
        if self.stream is not None:
            # Buffers freed by an earlier run may be reused here: copy only after its reads.
            self.stream.wait_stream(torch.cuda.current_stream(dev))
            for s in self.copies:
                s.dev.record_stream(self.stream)
            self.copy_start = torch.cuda.Event(enable_timing=True)
            self.copy_end = torch.cuda.Event(enable_timing=True)

    def _placement(self):
        """The one-launch placement, or None where its layout checks fail (then per piece)."""
        from blend.triton_kernels.placement import Placement, PlacePiece

        b = self.b
        try:
            return Placement(
                [self.kv.layer(layer) for layer in range(self.num_layers)],
                [PlacePiece(p.src.dev, p.lo, p.hi, p.slots, p.delta) for p in self.pieces],
                b.delta_table(max(p.delta for p in self.pieces)), b.adapter.rope.is_neox)
        except ValueError as exc:
            log.warning("chunk placement per piece: %s", exc)
            return None

    def _issue(self, upto: int) -> None:
        """Queue the copies of every layer group that starts before layer `upto`."""
        upto = min(upto, self.num_layers)
        if self.issued >= upto or not self.copies:
            self.issued = max(self.issued, upto)
            return
        with torch.cuda.stream(self.stream):
            if self.issued == 0:
                self.copy_start.record(self.stream)
            for g0, g1 in self.groups:
                if g1 <= self.issued:
                    continue
                if g0 >= upto:
                    break
                for s in self.copies:  # layers [g0, g1) of a chunk are contiguous: one DMA
                    s.dev[g0:g1].copy_(s.host[g0:g1], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
                for layer in range(g0, g1):
                    self.events[layer] = ev
                self.issued = g1
            if self.issued == self.num_layers:
                self.copy_end.record(self.stream)

    def hook(self, layer: int) -> None:
        """Place layer `layer` of every piece: wait for its copy, write it, K re-rotated."""
        if self.window is not None:
            self._issue(layer + 1 + self.window)
        else:
            self._issue(2 if layer == 0 else self.num_layers)
        if not self.pieces or layer < self.placed:
            return
        ev = self.events[layer]
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
        if self.placement is not None:
            # Chunks already on the device need no wait: every layer goes in one launch.
            upto = layer + 1 if self.copies else self.num_layers
            self.placement.place(range(layer, upto))
            self.placed = upto
            return
        ops = self.b.ops
        k_cache, v_cache = self.kv.layer(layer)
        for p, slots in zip(self.pieces, self.slots):
            kv = p.src.dev[layer]
            ops.fuse_kv(k_cache, v_cache, slots, kv[0, p.lo:p.hi], kv[1, p.lo:p.hi])
        if self._rot is not None:
            slots, delta, cos_sin = self._rot
            ops.rerotate_k(k_cache, slots, delta, cos_sin, self.b.adapter.rope.is_neox)
        self.placed = layer + 1

    def finish(self, tier: DeviceTier | None) -> None:
        """After the run: keep host chunks' device copies in the GPU tier where asked."""
        self._issue(self.num_layers)  # a run that stopped early still owes every copy
        if tier is not None:
            for s in self.copies:
                if s.keep:
                    tier.put(s.key, s.dev)

    def copy_ms(self) -> float | None:
        """GPU time from the first copy to the last (only after the device reached it)."""
        if self.copy_start is None or self.issued == 0:
            return None
        return float(self.copy_start.elapsed_time(self.copy_end))


def copy_groups(num_layers: int) -> list[tuple[int, int]]:
    """Layer ranges copied as one DMA per chunk: 1, 1, 2, 4, ... layers from both ends.

    One copy per chunk and layer costs host time per call, all of it issued before layer
    1's kernels, and the calls grow with chunks x layers. Small groups at the
    start keep layer 0's wait short; small groups at the end keep a copy-bound blend (the
    cheap selection) from waiting for a large last group. 32 layers: 10 groups.
    """
    front: list[tuple[int, int]] = []
    back: list[tuple[int, int]] = []
    lo, hi, size = 0, num_layers, 1
    while lo < hi:
        front.append((lo, min(lo + size, hi)))
        lo = front[-1][1]
        if lo < hi:
            back.append((max(hi - size, lo), hi))
            hi = back[-1][0]
        size = size if len(front) == 1 else 2 * size
    return front + back[::-1]


def source_for(key: str, t: torch.Tensor, device: torch.device, tier: DeviceTier | None,
               from_tier: bool) -> tuple[ChunkSource, bool]:
    """A `ChunkSource` for a fetched tensor; True in the second slot when `t` had to be pinned.

    A pageable host tensor (a backend without a pinned tier) is pinned here, once,
    so no pageable copy ever reaches the device stream.
    """
    if from_tier or (t.device.type == device.type and device.index in (None, t.device.index)):
        return ChunkSource(key, None, t), False
    if device.type != "cuda":
        return ChunkSource(key, None, t.to(device)), False
    pinned = False
    if not t.is_pinned():
        t, pinned = t.pin_memory(), True
    nbytes = t.numel() * t.element_size()
    keep = tier is not None and tier.fits(nbytes)
    return ChunkSource(key, t, torch.empty(t.shape, dtype=t.dtype, device=device), keep), pinned

