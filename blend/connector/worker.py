"""Worker half of `BlendConnector`: blend the claimed context into vLLM's paged cache.

Runs inside `start_load_kv`, before the step's forward, for every blended
request of the step in one batched `Blender.run`:

1. each chunk's standalone KV comes from the GPU tier or the store (or, on a
   miss, is computed now from the chunk alone and stored after the step);
2. `blend.chunk_loader.LayerLoad` writes it into the request's own blocks and
   re-rotates its K from positions `0..n-1` to where the chunk sits, layer by
   layer just before the blender reads that layer, with the copies from pinned
   host memory running a few layers ahead on a side stream;
3. text between chunks (and any chunk whose KV is unavailable) is forced into
   the recompute set, everything else competes on deviation;
4. the fused KV stays in vLLM's blocks, and vLLM prefills the question.

Every token the scheduler claimed is thus either placed from a chunk's KV or
recomputed: no path leaves a claimed block unwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blend import jit_watch
from blend.blender import Blender, BlendSeq, BlendTrace
from blend.chunk_kv import compute_chunk_kv
from blend.chunk_loader import ChunkSource, LayerLoad, Piece, source_for
from blend.config import BlendConfig
from blend.connector.guards import check_block_size, check_kv_dtype
from blend.connector.identity import vllm_identity
from blend.connector.kv_layout import layer_views, probe_cpu_layout
from blend.connector.metadata import BlendRequest, SaveRequest
from blend.connector.saver import ChunkSaver
from blend.keys import chunk_key, model_fingerprint
from blend.kv import slots_for
from blend.log import get_logger
from blend.store.gpu_tier import DeviceTier, resolve_gpu_bytes

log = get_logger("Connector")

# One blend run holds at most this many context tokens (a larger request runs alone): the
# full-recompute layers' activations and the device copies of host chunks scale with it.
MAX_RUN_TOKENS = 32768
MUST_SAVE_WAIT_S = 300.0  # how long an on_miss="compute" save waits for the writer
# The per-blend DEBUG line; `bench/worker_log.py` parses it out of a bench's engine log.
BLEND_LINE = ("blended %d request(s), %d tokens, %d recomputed, chunks %d found of %d "
              "(%d computed), fetch %.1f ms, %.1f ms host")


@contextlib.contextmanager
def _sync_check():
    """With BLEND_SYNC_CHECK=1 on CUDA, any device sync inside raises (the hot-path test)."""
    on = os.environ.get("BLEND_SYNC_CHECK") == "1" and torch.cuda.is_available()
    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if on:
            torch.cuda.set_sync_debug_mode(0)


class VllmPagedKV:
    """The blender's paged-cache interface over vLLM's per-layer cache tensors."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], block_size: int) -> None:
        self.k, self.v, self.block_size = k, v, block_size

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


@dataclass
class WorkerStats:
    """Counters since the last `take()`; the connector reports them to vLLM's stats."""

    blended_requests: int = 0
    chunks: int = 0
    chunk_hits: int = 0
    chunk_tokens: int = 0
    chunk_hit_tokens: int = 0
    blended_tokens: int = 0
    recomputed_tokens: int = 0
    bytes_fetched: int = 0  # chunk KV bytes served by the GPU tier or the store
    bytes_loaded: int = 0  # of those, host -> device bytes
    gpu_hits: int = 0  # chunks served by the GPU tier (no copy)
    pinned_on_load: int = 0  # chunks a backend returned pageable, pinned on the way (slow)
    load_ms: float = 0.0
    blend_ms: float = 0.0
    computed_chunks: int = 0
    stored_chunks: int = 0
    save_requested: int = 0  # chunks extracted from a prompt's blocks for the store
    save_dropped: int = 0  # over the saver's pending bound: not saved
    store_evictions: int = 0  # host and disk tier evictions (the store's counters' growth)
    jit_compiles: int = 0  # blend-kernel Triton compiles after the warm-up
    graph_replays: int = 0  # layers replayed from CUDA graphs (cuda_graphs)
    rank_misses: int = 0  # chunks this rank had but another TP rank lacked (recomputed)
    extra: dict[str, Any] = field(default_factory=dict)

    def take(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        self.__init__()
        return d


def _layer_index(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)


class BlendWorker:
    def __init__(self, vllm_config: Any, extra: dict[str, Any], config: BlendConfig) -> None:
        self.vllm_config = vllm_config
        self.extra = extra
        self.config = config
        self.block_size = vllm_config.cache_config.block_size
        self.blender: Blender | None = None
        self.kv: VllmPagedKV | None = None
        self.store = None
        self.gpu_tier: DeviceTier | None = None
        self.stats = WorkerStats()
        self.saver: ChunkSaver | None = None
        self._saver_seen = (0, 0, 0)  # saver (saved, dropped) and store evictions at last take
        self._jit_seen = 0
        self._replays_seen = 0
        self.trace_dir = extra.get("trace_dir")
        self.rank, self.fingerprint, self.tp = 0, "", None
        self.last_traces: dict[str, dict] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._blenders: dict[str, Blender] = {}

    # ------------------------------------------------------------------ set-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Bind the model, the store and K/V views now, so a misfit fails at start-up."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tp_group

        from blend.models.vllm_llama import vllm_adapter_for
        from blend.patches.model_capture import captured_model
        from blend.store import open_store

        self.rank = int(get_tensor_model_parallel_rank())
        identity = vllm_identity(self.vllm_config, self.rank)
        adapter = vllm_adapter_for(captured_model(), identity)
        self.fingerprint = model_fingerprint(**identity)
        self.store = open_store(self.extra.get("store"), self.fingerprint)
        group = get_tp_group()
        self.tp = group if group.world_size > 1 else None
        if self.trace_dir and self.rank:  # each rank traces its own selection
            self.trace_dir = os.path.join(self.trace_dir, f"rank{self.rank}")
        check_kv_dtype(self.vllm_config.cache_config.cache_dtype)
        names = sorted(kv_caches, key=_layer_index)
        if len(names) != adapter.num_layers:
            raise RuntimeError(f"cacheblend: {len(names)} KV cache layers for a "
                               f"{adapter.num_layers}-layer model")
        ks, vs, raw = [], [], {}
        layout = None
        backend = self._backend_name(names[0])
        for name in names:
            if self._backend_name(name) != backend:
                raise RuntimeError("cacheblend: layers use different attention backends")
            kv = kv_caches[name]
            if backend == "CPU_ATTN" and layout is None:
                layout = self._probe_cpu(kv, adapter)
            k, v = layer_views(kv, backend, layout)
            check_block_size(k.shape[1], self.block_size, backend)
            ks.append(k)
            vs.append(v)
            raw[k.data_ptr()] = kv
        self.kv = VllmPagedKV(ks, vs, self.block_size)
        ops = None
        if backend == "CPU_ATTN" and self.config.attention_backend == "auto":
            # vLLM's own CPU kernel: the context KV then matches plain vLLM's (see the module).
            from blend.connector.cpu_attention import VllmCpuAttention, vllm_cpu_ops

            ops = vllm_cpu_ops(VllmCpuAttention(raw, self._isa, adapter.num_q_heads,
                                                adapter.num_kv_heads, adapter.head_dim,
                                                self.block_size))
        self.blender = Blender(adapter, self.config, ops=ops)
        # Built now: its first build copies host tables to the device (a sync).
        self.blender.delta_table(self.vllm_config.model_config.max_model_len)
        from blend.store.spec import parse

        gpu_bytes = resolve_gpu_bytes(parse(self.extra.get("store"))["gpu_bytes"],
                                      torch.device(adapter.device))
        self.gpu_tier = DeviceTier(gpu_bytes) if gpu_bytes > 0 else None
        self.saver = ChunkSaver(self.store, self.extra["save_pending_bytes"])  # checked at start
        if self.blender.ops.name in ("triton", "flash"):  # JIT kernels: compile them now
            self._warm_up()  # and capture the graphs
        else:
            self._capture_graphs()  # only says why there are none
        log.info("worker ready: %s, %d layers, block size %d, backend %s, blend ops %s, "
                 "model ops %s, store %s, GPU tier %.1f GiB", type(adapter.model).__name__,
                 adapter.num_layers, self.block_size, backend, self.blender.ops.name,
                 "vllm-cuda" if getattr(adapter, "fast", False) else "modules",
                 type(self.store).__name__, gpu_bytes / (1 << 30))

    def _warm_up(self) -> None:
        """One small blend on a scratch cache, so that the Triton kernels compile now and
        not inside the first request (seconds, seen as a multi-second TTFT outlier)."""
        from blend.chunk_placement import ChunkPlacement, layer_loader
        from blend.kv import PagedKV

        t0 = time.perf_counter()
        a, bs = self.blender.adapter, self.block_size
        n = 3 * bs + 5  # several blocks, a partial last one: the serving specialisations
        gen = torch.Generator().manual_seed(0)
        ids = [torch.randint(10, 1000, (n,), generator=gen) for _ in range(2)]
        kvs = [compute_chunk_kv(self.blender, t.tolist()) for t in ids]
        kv = PagedKV(a.num_layers, -(-(2 * n + 8) // bs) + 1, bs, a.num_kv_heads, a.head_dim,
                     a.dtype, a.device)
        row = kv.allocate(2 * n + 8)
        dev = torch.device(a.device)
        places = [ChunkPlacement(c, torch.as_tensor(slots_for(row, torch.arange(s, s + n), bs),
                                               device=dev), s)
                  for c, s in zip(kvs, (4, 4 + n))]
        tokens = torch.cat([torch.tensor([1, 2, 3, 4]), *ids, torch.arange(20, 24)])
        forced = torch.ones(tokens.numel(), dtype=torch.bool)
        forced[4:4 + 2 * n] = False
        self.blender.run([BlendSeq(tokens, 0, row, forced)], kv, blend=True,
                         layer_hook=layer_loader(self.blender, kv, places))
        self._warm_up_more(kv, row, n)
        self._capture_graphs()  # before the JIT watch: a capture's compiles are start-up ones
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        jit_watch.install()
        jit_watch.arm()
        log.info("warm-up blend: kernels ready in %.1f s", time.perf_counter() - t0)

    def _capture_graphs(self) -> None:
        """The steady layers' CUDA graphs (`cuda_graphs`), every bucket at start-up against
        vLLM's own cache, so no request pays a capture."""
        if not self.config.cuda_graphs:
            return
        if torch.device(self.blender.adapter.device).type != "cuda":
            log.warning("cuda_graphs: needs CUDA and the triton backend (blend ops %s); the "
                        "blend runs eagerly", self.blender.ops.name)
            return
        t0 = time.perf_counter()
        max_blocks = -(-self.vllm_config.model_config.max_model_len // self.block_size)
        graphs = self.blender.use_graphs(self.kv, max_blocks)
        if graphs is not None:
            graphs.capture_all()
            log.info("cuda_graphs: %d buckets captured in %.1f s", len(graphs.buckets),
                     time.perf_counter() - t0)

    def _warm_up_more(self, kv, row: torch.Tensor, n: int) -> None:
        """The variants a small blend does not reach: split-KV attention (few query tiles
        over long keys, then the combine kernel) and the save path's extraction."""
        from blend.triton_kernels.attention import selected_attention
        from blend.triton_kernels.placement import Placement, PlacePiece

        a = self.blender.adapter
        dev = torch.device(a.device)
        k0, v0 = kv.layer(0)
        q = torch.randn((3, a.num_q_heads, a.head_dim), dtype=a.dtype, device=dev)
        pos = torch.tensor([n, n + 1, n + 2], dtype=torch.int64, device=dev)
        bt = row.to(dev, torch.int32)[None]
        for splits in (1, 2):
            selected_attention(q, k0, v0, pos, [0, 3], bt, [n + 3], a.head_dim ** -0.5,
                               num_splits=splits)
        out = torch.empty((a.num_layers, 2, n, a.num_kv_heads, a.head_dim), dtype=a.dtype,
                          device=dev)
        slots = slots_for(row, torch.arange(4, 4 + n), self.block_size)
        Placement([kv.layer(i) for i in range(a.num_layers)], [PlacePiece(out, 0, n, slots, 4)],
                  self.blender.delta_table(4 + n), a.rope.is_neox).extract(range(a.num_layers))

    def _backend_name(self, layer_name: str) -> str:
        layer = self.vllm_config.compilation_config.static_forward_context[layer_name]
        return layer.get_attn_backend().get_name()

    def _probe_cpu(self, kv: torch.Tensor, adapter) -> Any:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cache_dtype = self.vllm_config.cache_config.cache_dtype
        self._isa = _get_attn_isa(kv.dtype, self.block_size, adapter.head_dim, cache_dtype)
        return probe_cpu_layout(self._isa, kv.shape[1], self.block_size, adapter.head_dim,
                                kv.dtype)

    # ------------------------------------------------------------------ per step
    def _key(self, req: BlendRequest, ch) -> str | None:
        """The chunk's key in this rank's store: the scheduler keys rank 0's shard."""
        if self.tp is not None and not ch.whole:
            return None  # found by content in part: only rank 0's key is known (recomputed)
        if self.rank == 0:
            return ch.key
        return chunk_key(self.fingerprint, req.token_ids[ch.start:ch.end])

    def _fetch(self, key: str, n: int) -> ChunkSource | None:
        """A chunk's KV from the GPU tier or the store, or None (absent or not fitting)."""
        a = self.blender.adapter
        t0 = time.perf_counter()
        t = self.gpu_tier.get(key) if self.gpu_tier is not None else None
        gpu_hit = t is not None
        if t is None and self.saver is not None:
            t = self.saver.get(key)  # being saved: still on the device
        in_tier = t is not None
        if t is None and self.store is not None:
            t = self.store.fetch(key)
        src = None
        if t is not None and (tuple(t.shape) != (a.num_layers, 2, n, a.num_kv_heads, a.head_dim)
                              or t.dtype != a.dtype):
            log.warning("chunk %s: stored %s %s does not fit; recomputing", key[:12],
                        tuple(t.shape), t.dtype)
        elif t is not None:
            src, pinned = source_for(key, t, torch.device(a.device), self.gpu_tier, in_tier)
            self.stats.gpu_hits += int(gpu_hit)
            self.stats.pinned_on_load += int(pinned)
            nbytes = t.numel() * t.element_size()
            self.stats.bytes_fetched += nbytes
            if src.host is not None:
                self.stats.bytes_loaded += nbytes
        self.stats.load_ms += (time.perf_counter() - t0) * 1e3
        return src

    def _fetch_all(self, requests: list[BlendRequest]) -> dict[str, ChunkSource | None]:
        """Every chunk the run places, fetched once, in the order of the step's metadata.

        With tensor parallelism each rank reads its own shard, so one rank can miss where
        another hits; the ranks then agree (MIN over the TP group's CPU group, no device
        sync) and a chunk any rank lacks is recomputed on every rank alike.
        """
        found: dict[str, ChunkSource | None] = {}
        for req in requests:
            for ch in req.chunks:
                if max(ch.start, req.num_local) < min(ch.end, req.context_end):
                    key = self._key(req, ch)
                    if key is not None and key not in found:
                        found[key] = self._fetch(key, ch.stored_len)
        if self.tp is not None and found:
            import torch.distributed as dist

            have = torch.tensor([src is not None for src in found.values()], dtype=torch.int32)
            dist.all_reduce(have, op=dist.ReduceOp.MIN, group=self.tp.cpu_group)
            for key, ok in zip(list(found), have.tolist()):
                if not ok and found[key] is not None:
                    log.warning("chunk %s: another rank lacks its shard; recomputing on every "
                                "rank", key[:12])
                    found[key] = None
                    self.stats.rank_misses += 1
        return found

    def _chunk_kv(self, req: BlendRequest, ch, found: dict[str, ChunkSource | None],
                  computed: set[str]) -> ChunkSource | None:
        """Chunk `ch`'s KV for this run: fetched, or (on a miss) computed from the chunk alone."""
        key = self._key(req, ch)
        src = found.get(key)
        if src is not None:
            if key not in computed:
                self.stats.chunk_hits += 1
                self.stats.chunk_hit_tokens += ch.end - ch.start
            return src
        if req.on_miss != "compute" or not ch.whole or key is None:
            return None
        kv = compute_chunk_kv(self.blender, _ids_list(req.token_ids[ch.start:ch.end]))
        self._keep(key, kv, wait_s=MUST_SAVE_WAIT_S)  # asked to store: never dropped for speed
        found[key] = src = ChunkSource(key, None, kv)
        computed.add(key)
        self.stats.computed_chunks += 1
        return src

    def _plan(self, req: BlendRequest, config: BlendConfig, found: dict[str, ChunkSource | None],
              computed: set[str]) -> tuple[BlendSeq, list[Piece]]:
        """The request's BlendSeq over `[num_local, context_end)` and its chunk pieces.

        Per-token work is done once per request in numpy (the slots of the whole range,
        the forced mask, the ids); a chunk only slices them: per-chunk tensor ops and
        `torch.tensor` over token lists made the host time grow with the chunk count.
        """
        p0, end = req.num_local, req.context_end
        row = torch.from_numpy(np.asarray(req.block_ids, dtype=np.int32))
        slots = slots_for(row, torch.arange(p0, end), self.block_size)  # host int64, no sync
        forced = np.ones(end - p0, dtype=bool)  # text is recomputed unless a chunk covers it
        pieces: list[Piece] = []
        sink = config.sink_tokens
        for ch in req.chunks:
            lo, hi = max(ch.start, p0), min(ch.end, end)
            self.stats.chunks += 1
            self.stats.chunk_tokens += ch.end - ch.start
            if lo >= hi:
                continue  # wholly inside vLLM's prefix cache (or past the context)
            src = self._chunk_kv(req, ch, found, computed)
            if src is None:
                continue  # stays forced: recomputed like text
            row0 = ch.start - ch.src_start  # where the stored chunk's row 0 sits
            pieces.append(Piece(src, lo - row0, hi - row0, slots[lo - p0:hi - p0], row0))
            forced[lo - p0: hi - p0] = False
            if sink and ch.start >= p0:
                forced[ch.start - p0: min(ch.start + sink, hi) - p0] = True
        tokens = np.asarray(req.token_ids, dtype=np.int64)
        probe = question_probes(req, config, self.block_size)
        ids = torch.from_numpy(np.concatenate([tokens[p0:end], probe]))
        forced_t = torch.from_numpy(np.concatenate([forced, np.ones(len(probe), dtype=bool)]))
        seq = BlendSeq(ids, p0, row, forced_t, num_probes=len(probe))
        if self.blender.fault == "rope" and pieces:  # test-only (blend/faults.py)
            last = pieces[-1]
            last.delta += 1  # its cached K re-rotated one position too far
            seq.fault_span = (last.lo + last.delta - 1 - p0, last.hi + last.delta - 1 - p0)
        return seq, pieces

    def start_load_kv(self, requests: list[BlendRequest]) -> None:
        if not requests:
            return
        assert self.blender is not None and self.kv is not None, "register_kv_caches not called"
        groups: dict[str, list[BlendRequest]] = {}
        for req in requests:  # one batched run per distinct per-request config
            groups.setdefault(json.dumps(req.config, sort_keys=True), []).append(req)
        traced = []
        with _sync_check():
            for reqs in groups.values():
                for run in _by_tokens(reqs, MAX_RUN_TOKENS):
                    traced.append(self._run(run))
        for item in traced:  # tracing reads GPU timings: a sync, kept off the checked path
            if item is None:
                continue
            if item[3].defer_cpu:  # CUDA: the sync and the JSON off the step, in a thread
                self._trace_writer().submit(self._write_traces_logged, *item)
            else:
                self._write_traces(*item)

    def _trace_writer(self) -> ThreadPoolExecutor:
        """One thread writes the traces of CUDA blends: waiting for the blend's end and
        writing 32k-token deviation lists inside the step held vLLM's own forward back
        (tens of ms at 32k), so a traced TTFT overstated what follows the blend."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="cacheblend-trace")
        return self._writer

    def _blender_for(self, config: dict | None) -> Blender:
        if config is None:
            return self.blender
        key = json.dumps(config, sort_keys=True)
        if key not in self._blenders:
            self._blenders[key] = self.blender.with_config(BlendConfig.from_dict(config))
        return self._blenders[key]

    def _run(self, requests: list[BlendRequest]) -> tuple | None:
        """Blend one batch; returns what its traces need when tracing is on."""
        t0 = time.perf_counter()
        t_wall = time.time()
        blender = self._blender_for(requests[0].config)
        seqs, pieces, computed = [], [], set()
        fetch0 = self.stats.load_ms
        found = self._fetch_all(requests)
        fetch_ms = self.stats.load_ms - fetch0
        t_plan = time.perf_counter()
        for req in requests:
            seq, pcs = self._plan(req, blender.config, found, computed)
            seqs.append(seq)
            pieces += pcs
        # Named ranges for bench/profile_vllm_gpu.py (nearly free without a profiler).
        rf = torch.profiler.record_function
        t_issue = time.perf_counter()
        with rf("cacheblend.issue_copies"):
            load = LayerLoad(blender, self.kv, pieces)
        cuda = load.cuda
        trace = BlendTrace(defer_cpu=cuda) if self.trace_dir else None
        events = None
        if trace is not None and cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            events[0].record()
        hook = load.hook if trace is None or cuda else _timed(load.hook, trace)
        t_prep = time.perf_counter()
        prep_ms = (t_prep - t0) * 1e3
        with rf("cacheblend.blend"):
            out = blender.run(seqs, self.kv, blend=True, trace=trace, layer_hook=hook)
            load.finish(self.gpu_tier)
        if events is not None:
            events[1].record()
        st = self.stats
        st.blended_requests += len(requests)
        st.blended_tokens += sum(int(s.token_ids.numel()) - s.num_probes for s in seqs)
        recomputed = sum(int(x.numel()) for x in out.selected)
        st.recomputed_tokens += recomputed
        st.blend_ms += (time.perf_counter() - t0) * 1e3
        if log.isEnabledFor(logging.DEBUG):  # off the hot path unless asked for
            log.debug(BLEND_LINE, len(requests),
                      sum(int(s.token_ids.numel()) for s in seqs), recomputed,
                      sum(v is not None for v in found.values()), len(found), len(computed),
                      fetch_ms, (time.perf_counter() - t0) * 1e3)
        if trace is None:
            return None
        trace.timings_ms["fetch"] = fetch_ms
        trace.timings_ms["plan"] = (t_issue - t_plan) * 1e3  # BlendSeqs and pieces
        trace.timings_ms["issue"] = (t_prep - t_issue) * 1e3  # LayerLoad set-up
        trace.timings_ms["prep"] = prep_ms  # fetch, plans, copies queued: before the blend
        trace.timings_ms["start_unix_ms"] = t_wall * 1e3  # against the caller's clock
        trace.timings_ms["host"] = (time.perf_counter() - t0) * 1e3  # enqueue time on CUDA
        return requests, seqs, out.selected, trace, load, events

    def _keep(self, key: str, kv: torch.Tensor, wait_s: float = 0.0) -> None:
        """Chunk KV this worker made: to the GPU tier now, to the store in the background."""
        if self.gpu_tier is not None:
            self.gpu_tier.put(key, kv)
        self.saver.submit(key, kv, wait_s=wait_s)  # a drop is counted by the saver

    def wait_for_save(self, saves: list[SaveRequest]) -> None:
        """Save the chunks vLLM or the blend computed inside prompts this step.

        Runs after the step's forward was queued: one extraction launch reads every chunk
        out of its request's blocks (K rotated back to position 0) into fresh device
        buffers, ordered before any later step can reuse those blocks; the saver thread
        takes them to the host and the store from there.
        """
        if not saves:
            return
        from blend.triton_kernels.placement import Placement, PlacePiece, extract_chunks_ref

        a = self.blender.adapter
        dev = torch.device(a.device)
        pieces, keys = [], []
        for s in saves:
            row = torch.tensor(s.block_ids, dtype=torch.int32)
            for c in s.chunks:
                if self.saver.get(c.key) is not None:
                    continue
                n = c.end - c.start
                buf = torch.empty((a.num_layers, 2, n, a.num_kv_heads, a.head_dim),
                                  dtype=a.dtype, device=dev)
                slots = slots_for(row, torch.arange(c.start, c.end), self.block_size)
                pieces.append(PlacePiece(buf, 0, n, slots, c.start))
                keys.append(c.key)
        if not pieces:
            return
        layers = [self.kv.layer(layer) for layer in range(a.num_layers)]
        cos_sin = self.blender.delta_table(max(p.delta for p in pieces))
        with torch.profiler.record_function("cacheblend.extract"):
            if dev.type == "cuda":
                Placement(layers, pieces, cos_sin, a.rope.is_neox).extract(range(a.num_layers))
            else:
                extract_chunks_ref(layers, pieces, range(a.num_layers), cos_sin, a.rope.is_neox)
        self.stats.save_requested += len(keys)
        for key, p in zip(keys, pieces):
            self._keep(key, p.src)

    def take_stats(self) -> dict[str, Any]:
        """This step's counters, with the saver's and the store's progress since the last."""
        st = self.stats
        if self.saver is not None:
            saved, dropped = self.saver.stats.saved, self.saver.stats.dropped
            ev = _evictions(self.store)
            s0, d0, e0 = self._saver_seen
            st.stored_chunks += saved - s0
            st.save_dropped += dropped - d0
            st.store_evictions += ev - e0
            self._saver_seen = (saved, dropped, ev)
        jit = jit_watch.compiles()
        st.jit_compiles += jit - self._jit_seen
        self._jit_seen = jit
        graphs = self.blender.graphs if self.blender is not None else None
        if graphs is not None:
            st.graph_replays += graphs.replays - self._replays_seen
            self._replays_seen = graphs.replays
        return st.take()

    def _write_traces_logged(self, *item) -> None:
        try:
            self._write_traces(*item)
        except Exception:  # noqa: BLE001 - a trace never fails serving
            log.exception("writing a blend trace failed")

    def _write_traces(self, requests, seqs, selected, trace: BlendTrace, load: LayerLoad,
                      events) -> None:
        from blend.trace import write_batch

        if events is not None:  # GPU time of the blend and of the copies
            events[1].synchronize()
            if load.copy_end is not None and load.issued:
                load.copy_end.synchronize()
            trace.timings_ms["blend"] = float(events[0].elapsed_time(events[1]))
            copy = load.copy_ms()
            if copy is not None:
                trace.timings_ms["load"] = copy
        if trace.defer_cpu:
            trace.to_cpu()
        cfg = self._blender_for(requests[0].config).config
        for doc in write_batch(self.trace_dir, trace, seqs, cfg, requests):
            self.last_traces[doc["req_id"]] = doc


def _evictions(store) -> int:
    """Host and disk tier evictions so far (0 for backends that do not count them)."""
    try:
        st = store.stats()
    except Exception:  # noqa: BLE001 - metrics never fail a step
        return 0
    return int(st.get("memory_evictions", 0)) + int(st.get("disk_evictions", 0))


def question_probes(req: BlendRequest, config: BlendConfig, block_size: int) -> np.ndarray:
    """The question tokens that probe a query-aware blend (none for `deviation`), int64.

    vLLM prefills the question after the blend, in the same step, and writes its K/V
    over whatever the probes left there. Only positions inside the request's allocated
    blocks probe: those blocks are the request's own, and vLLM writes every position
    of them before it reads it.
    """
    if config.selection == "deviation":
        return np.zeros(0, dtype=np.int64)
    q_end = min(len(req.token_ids), len(req.block_ids) * block_size)
    return np.asarray(req.token_ids[req.context_end:q_end], dtype=np.int64)


def _ids_list(ids) -> list[int]:
    """Token ids as Python ints (the metadata carries an array; some callers want a list)."""
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)


def _by_tokens(requests: list[BlendRequest], budget: int) -> list[list[BlendRequest]]:
    """Consecutive runs of requests holding at most `budget` blended tokens each."""
    runs: list[list[BlendRequest]] = []
    size = 0
    for req in requests:
        if runs and size + req.num_blend <= budget:
            runs[-1].append(req)
            size += req.num_blend
        else:
            runs.append([req])
            size = req.num_blend
    return runs


def _timed(hook, trace: BlendTrace):
    """On the CPU, time each layer's load and compute (blend.trace.timed_layer_hook)."""
    from blend.trace import timed_layer_hook

    return timed_layer_hook(hook, trace)
