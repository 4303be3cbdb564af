"""Worker half of `BlendConnector`: blend the claimed context into vLLM's paged cache.

Runs inside `start_load_kv`, before the step's forward, for every blended
request of the step in one batched `Blender.run`:

1. each chunk's standalone KV comes from the store (or, on a miss, is
   computed now from the chunk alone and stored after the step);
2. it is written into the request's own blocks and its K re-rotated from
   positions `0..n-1` to where the chunk sits, layer by layer just before the
   blender reads that layer;
3. text between chunks (and any chunk whose KV is unavailable) is forced into
   the recompute set, everything else competes on deviation;
4. the fused KV stays in vLLM's blocks, and vLLM prefills the question.

Every token the scheduler claimed is thus either placed from a chunk's KV or
recomputed: no path leaves a claimed block unwritten.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from blend.blender import Blender, BlendSeq, BlendTrace
from blend.chunk_kv import Placement, compute_chunk_kv, layer_loader
from blend.config import BlendConfig
from blend.connector_identity import vllm_identity
from blend.connector_kv import layer_views, probe_cpu_layout
from blend.connector_meta import BlendRequest
from blend.keys import model_fingerprint
from blend.kv import slots_for
from blend.log import get_logger

log = get_logger("Connector")


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
    bytes_loaded: int = 0
    load_ms: float = 0.0
    blend_ms: float = 0.0
    computed_chunks: int = 0
    stored_chunks: int = 0
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
        self.stats = WorkerStats()
        self._pending_puts: list[tuple[str, torch.Tensor]] = []
        self.trace_dir = extra.get("trace_dir")
        self.last_traces: dict[str, dict] = {}
        self._blenders: dict[str, Blender] = {}

    # ------------------------------------------------------------------ set-up
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Bind the model, the store and K/V views now, so a misfit fails at start-up."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from blend.models.vllm_llama import vllm_adapter_for
        from blend.patches.model_capture import captured_model
        from blend.store import open_store

        identity = vllm_identity(self.vllm_config, get_tensor_model_parallel_rank())
        adapter = vllm_adapter_for(captured_model(), identity)
        self.store = open_store(self.extra.get("store"), model_fingerprint(**identity))
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
            ks.append(k)
            vs.append(v)
            raw[k.data_ptr()] = kv
        self.kv = VllmPagedKV(ks, vs, self.block_size)
        ops = None
        if backend == "CPU_ATTN" and self.config.attention_backend == "auto":
            # vLLM's own CPU kernel: the context KV then matches plain vLLM's (see the module).
            from blend.connector_attention import VllmCpuAttention, vllm_cpu_ops

            ops = vllm_cpu_ops(VllmCpuAttention(raw, self._isa, adapter.num_q_heads,
                                                adapter.num_kv_heads, adapter.head_dim,
                                                self.block_size))
        self.blender = Blender(adapter, self.config, ops=ops)
        log.info("worker ready: %s, %d layers, block size %d, backend %s, blend ops %s, store %s",
                 type(adapter.model).__name__, adapter.num_layers, self.block_size, backend,
                 self.blender.ops.name, type(self.store).__name__)

    def _backend_name(self, layer_name: str) -> str:
        layer = self.vllm_config.compilation_config.static_forward_context[layer_name]
        return layer.get_attn_backend().get_name()

    def _probe_cpu(self, kv: torch.Tensor, adapter) -> Any:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cache_dtype = self.vllm_config.cache_config.cache_dtype
        if cache_dtype not in (None, "auto"):
            raise RuntimeError(f"cacheblend: kv_cache_dtype {cache_dtype!r} is not supported "
                               "(quantized KV cannot be blended); use 'auto'")
        self._isa = _get_attn_isa(kv.dtype, self.block_size, adapter.head_dim, cache_dtype)
        return probe_cpu_layout(self._isa, kv.shape[1], self.block_size, adapter.head_dim,
                                kv.dtype)

    # ------------------------------------------------------------------ per step
    def _chunk_kv(self, req: BlendRequest, i: int) -> torch.Tensor | None:
        ch = req.chunks[i]
        a = self.blender.adapter
        t0 = time.perf_counter()
        kv = self.store.get(ch.key) if self.store is not None else None
        if kv is not None:
            n = ch.end - ch.start
            if tuple(kv.shape) != (a.num_layers, 2, n, a.num_kv_heads, a.head_dim):
                log.warning("chunk %s: stored shape %s does not fit; recomputing",
                            ch.key[:12], tuple(kv.shape))
                kv = None
            else:
                self.stats.bytes_loaded += kv.numel() * kv.element_size()
                kv = kv.to(a.device, a.dtype, non_blocking=True)
                self.stats.chunk_hits += 1
                self.stats.chunk_hit_tokens += n
        self.stats.load_ms += (time.perf_counter() - t0) * 1e3
        if kv is None and req.on_miss == "compute":
            kv = compute_chunk_kv(self.blender, req.token_ids[ch.start:ch.end])
            self._pending_puts.append((ch.key, kv.detach().to("cpu")))
            self.stats.computed_chunks += 1
        return kv

    def _plan(self, req: BlendRequest, config: BlendConfig) -> tuple[BlendSeq, list[Placement]]:
        """The request's BlendSeq over `[num_local, context_end)` and its chunk placements."""
        a = self.blender.adapter
        p0, end = req.num_local, req.context_end
        row = torch.tensor(req.block_ids, dtype=torch.int32)
        forced = torch.ones(end - p0, dtype=torch.bool)  # text is recomputed unless a chunk covers it
        placements: list[Placement] = []
        sink = config.sink_tokens
        for i, ch in enumerate(req.chunks):
            lo, hi = max(ch.start, p0), min(ch.end, end)
            self.stats.chunks += 1
            self.stats.chunk_tokens += ch.end - ch.start
            if lo >= hi:
                continue  # wholly inside vLLM's prefix cache (or past the context)
            kv = self._chunk_kv(req, i)
            if kv is None:
                continue  # stays forced: recomputed like text
            pos = torch.arange(lo, hi)
            slots = slots_for(row, pos, self.block_size).to(a.device)
            placements.append(Placement(kv[:, :, lo - ch.start: hi - ch.start], slots, ch.start))
            forced[lo - p0: hi - p0] = False
            if sink and ch.start >= p0:
                forced[ch.start - p0: min(ch.start + sink, hi) - p0] = True
        ids = torch.tensor(req.token_ids[p0:end], dtype=torch.long)
        return BlendSeq(ids, p0, row, forced), placements

    def start_load_kv(self, requests: list[BlendRequest]) -> None:
        if not requests:
            return
        assert self.blender is not None and self.kv is not None, "register_kv_caches not called"
        groups: dict[str, list[BlendRequest]] = {}
        for req in requests:  # one batched run per distinct per-request config
            groups.setdefault(json.dumps(req.config, sort_keys=True), []).append(req)
        for reqs in groups.values():
            self._run(reqs)

    def _blender_for(self, config: dict | None) -> Blender:
        if config is None:
            return self.blender
        key = json.dumps(config, sort_keys=True)
        if key not in self._blenders:
            self._blenders[key] = self.blender.with_config(BlendConfig.from_dict(config))
        return self._blenders[key]

    def _run(self, requests: list[BlendRequest]) -> None:
        t0 = time.perf_counter()
        blender = self._blender_for(requests[0].config)
        seqs, placements = [], []
        for req in requests:
            seq, pl = self._plan(req, blender.config)
            seqs.append(seq)
            placements += pl
        trace = BlendTrace() if self.trace_dir else None
        out = blender.run(seqs, self.kv, blend=True, trace=trace,
                          layer_hook=_hook(layer_loader(blender, self.kv, placements), trace))
        st = self.stats
        st.blended_requests += len(requests)
        st.blended_tokens += sum(int(s.token_ids.numel()) for s in seqs)
        st.recomputed_tokens += sum(int(x.numel()) for x in out.selected)
        st.blend_ms += (time.perf_counter() - t0) * 1e3
        if trace is not None:
            self._write_traces(requests, seqs, out.selected, trace)
        log.debug("blended %d request(s), %d tokens, %d recomputed, %.1f ms", len(requests),
                  sum(int(s.token_ids.numel()) for s in seqs),
                  sum(int(x.numel()) for x in out.selected), (time.perf_counter() - t0) * 1e3)

    def wait_for_save(self) -> None:
        """Store the chunk KV computed for misses this step (off the blend's critical path)."""
        puts, self._pending_puts = self._pending_puts, []
        for key, kv in puts:
            if self.store.put(key, kv):
                self.stats.stored_chunks += 1

    def _write_traces(self, requests, seqs, selected, trace: BlendTrace) -> None:
        from blend.trace import write_batch

        cfg = self._blender_for(requests[0].config).config
        for doc in write_batch(self.trace_dir, trace, seqs, cfg, requests):
            self.last_traces[doc["req_id"]] = doc


def _hook(hook, trace: BlendTrace | None):
    """With tracing on, time each layer's load and compute (blend.trace.timed_layer_hook)."""
    if trace is None:
        return hook
    from blend.trace import timed_layer_hook

    return timed_layer_hook(hook, trace)
