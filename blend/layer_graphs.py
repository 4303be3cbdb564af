"""CUDA graphs for the blend's steady layers: one replay per layer instead of ~15 launches.

After the last check layer every layer but the last runs the same launches (norm,
qkv GEMM, RoPE, K/V fusion, selected attention, o-proj, norm, MLP) on the same rows.
At 8k the host needs about as long to enqueue them as the GPU to run them
(bench/notes/ttft_vllm_gpu.md, 2026-12-07), so the host sets the blend's pace; a
replay takes it off the critical path.

One graph per layer, not one for the range: a host-tier layer waits for its chunk
copy (the layer hook) between replays. Graphs are captured per row bucket, against
one KV cache, on static inputs. Padding rows write nowhere (slot -1, which `fuse_kv`
skips) and belong to no request (the attention's `cu` ends before them), so the real
rows compute what the eager loop computes, up to the GEMMs' kernel choice for another
row count. Off CUDA (the tests) the same static-input path runs eagerly: that checks
the padding and the input refresh without a capture.

Memory: the static inputs of every bucket plus one shared pool holding the largest
bucket's per-layer temporaries (about 0.6 GiB for an 8B model at 4,096 rows), outside
what vLLM's memory profile counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blend.log import get_logger
from blend.triton_kernels.paged import to_device

log = get_logger("Blender")

# Row buckets: at r=0.15 the largest covers ~24k-token contexts. Beyond it the GPU work per
# layer dwarfs its launches, so eager costs nothing there.
BUCKETS = (256, 512, 1024, 2048, 4096)
MAX_REQS = 8  # sequences per blend run; more run eagerly


class LayerGraphs:
    """The steady layers of blends over one KV cache (`kv.layer(l)`), per row bucket."""

    def __init__(self, adapter, ops, kv, max_blocks: int, buckets: Sequence[int] = BUCKETS,
                 max_reqs: int = MAX_REQS) -> None:
        self.adapter, self.ops, self.kv = adapter, ops, kv
        self.buckets, self.max_reqs, self.max_blocks = tuple(sorted(buckets)), max_reqs, max_blocks
        self.device = torch.device(adapter.device)
        self.capture = self.device.type == "cuda"  # off CUDA (tests): the same path, eagerly
        probe = adapter.embed(torch.zeros(1, dtype=torch.long, device=self.device))
        self.width = int(probe.shape[-1])  # the residual stream's row width (packed or not)
        self._sets: dict[int, _Bucket] = {}
        self._pool = None
        self.replays = 0  # layer replays served, for tests and logs

    def bucket(self, rows: int, reqs: int, blocks: int) -> int | None:
        """The bucket a run of `rows` active rows fits, or None (it runs eagerly)."""
        if rows == 0 or reqs > self.max_reqs or blocks > self.max_blocks:
            return None
        return next((b for b in self.buckets if b >= rows), None)

    def capture_all(self) -> None:
        """Capture every bucket now (start-up), so no request pays a capture."""
        for b in self.buckets:
            self._set(b)

    def start(self, hidden: torch.Tensor, pos: torch.Tensor, q_pos: torch.Tensor,
              slots: torch.Tensor, cu: Sequence[int], block_table: torch.Tensor,
              seq_lens: Sequence[int]) -> _Bucket | None:
        """Load one run's active rows into its bucket's static inputs (None: run eagerly)."""
        n, reqs = int(hidden.shape[0]), len(cu) - 1
        size = self.bucket(n, reqs, int(block_table.shape[1]))
        if size is None:
            return None
        b = self._set(size)
        pad = self.max_reqs - reqs
        b.h[:n].copy_(hidden)
        b.pos[:n].copy_(pos)
        b.q_pos[:n].copy_(q_pos)
        b.slots[:n].copy_(slots)
        b.slots[n:].fill_(-1)
        # Padding requests own no rows (their cu repeats the last) and no keys.
        b.cu.copy_(to_device(tuple(cu) + (cu[-1],) * pad, self.device))
        b.seq_lens.copy_(to_device(tuple(seq_lens) + (0,) * pad, self.device))
        b.block_table[:reqs, :block_table.shape[1]].copy_(block_table)
        b.rows = n
        return b

    def replay(self, b: _Bucket, layer: int) -> None:
        if self.capture:
            b.graphs[layer].replay()
        else:
            self._body(b, layer)
        self.replays += 1

    def _body(self, b: _Bucket, layer: int) -> None:
        """One layer over the static inputs; what a graph captures."""
        a = self.adapter
        k_cache, v_cache = self.kv.layer(layer)
        q, k, v, res = a.qkv(layer, b.h, b.pos)
        self.ops.fuse_kv(k_cache, v_cache, b.slots, k, v)
        attn = self.ops.attention(q, k_cache, v_cache, b.q_pos, b.cu, b.block_table, b.seq_lens,
                                  a.scale, num_splits=b.splits)
        b.h.copy_(a.finish_layer(layer, res, attn))

    def _set(self, size: int) -> _Bucket:
        b = self._sets.get(size)
        if b is not None:
            return b
        a = self.adapter
        splits = 1
        if self.device.type == "cuda":  # fixed per bucket: eager picks it per run
            from blend.triton_kernels.attention import num_splits_for, tile_tokens

            tok = tile_tokens(a.num_q_heads, a.num_kv_heads, a.head_dim)
            splits = num_splits_for(self.device, (size // tok + 1) * a.num_kv_heads)
        b = self._sets[size] = _Bucket(self, size, splits)
        if self.capture:
            self._capture(b)
        return b

    @torch.inference_mode()
    def _capture(self, b: _Bucket) -> None:
        """Every layer but the last, on inert inputs (no slot, no request): the warm-up run
        compiles and allocates without touching the cache, the capture records."""
        b.slots.fill_(-1)
        b.cu.zero_()
        b.seq_lens.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for layer in range(self.adapter.num_layers - 1):
                self._body(b, layer)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for layer in range(self.adapter.num_layers - 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._body(b, layer)
            b.graphs[layer] = g
        log.info("CUDA graphs: %d layers captured for %d rows (%d KV splits)",
                 len(b.graphs), b.size, b.splits)


class _Bucket:
    """Static inputs of one row bucket, and its graphs by layer."""

    def __init__(self, owner: LayerGraphs, size: int, splits: int) -> None:
        dev, reqs = owner.device, owner.max_reqs
        self.size, self.splits, self.rows = size, splits, 0
        self.h = torch.zeros((size, owner.width), dtype=owner.adapter.dtype, device=dev)
        self.pos = torch.zeros(size, dtype=torch.long, device=dev)
        self.q_pos = torch.zeros(size, dtype=torch.int32, device=dev)
        self.slots = torch.full((size,), -1, dtype=torch.long, device=dev)
        self.cu = torch.zeros(reqs + 1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(reqs, dtype=torch.long, device=dev)
        self.block_table = torch.zeros((reqs, owner.max_blocks), dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def output(self) -> torch.Tensor:
        """The residual stream after the last replayed layer (a view: read it before the
        next run of this bucket)."""
        return self.h[: self.rows]
