"""The blend: turn loaded chunk KV into near-full-prefill KV by recomputing the HKVD tokens.

One pass over the model's layers for a batch of sequences, on a paged cache
that already holds each chunk's re-rotated standalone KV:

* layers before the first check layer: every context token is recomputed and
  its fresh K/V written (for the default check layer 1 this is layer 0, whose
  KV is context-free, so it equals the cached KV after the RoPE fix);
* a check layer: fresh K/V of the still-active tokens are compared with the
  cached K/V; forced tokens plus the top-`ratio` deviating ones stay active
  (several check layers filter gradually). The `selection` policy can rank by
  the question's attention instead, or both (`blend/selection.py`), and the
  `cheap` policy replaces the check layer by a question-only probe pass;
* every layer: the active tokens' fresh K/V overwrite the cached K/V, then
  their attention runs over the fused cache with an exact causal mask by
  position.

With ratio 1 every token stays active: that is full prefill. With ratio 0
nothing past the pre-check layers is recomputed: full reuse with the RoPE fix.
The same loop without check layers is plain prefill (chunk KV, the question).
Sizes come from host metadata, so the pass never syncs the device per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from blend.config import BlendConfig
from blend.faults import active as active_fault
from blend.faults import fault_rows
from blend.kv import slots_for
from blend.layer_graphs import BUCKETS, LayerGraphs
from blend.log import get_logger
from blend.models.base import ModelAdapter
from blend.ops import BlendOps, get_ops
from blend.run_plan import RunPlan, plan_run
from blend.selection import combine, per_token, query_mass
from blend.triton_kernels.paged import to_device

logger = get_logger("Blender")


@dataclass
class BlendSeq:
    """One sequence's work: tokens `start..start+len(token_ids)-1`, keys `0..end-1` in the cache."""

    token_ids: torch.Tensor  # [n] ids of the tokens computed here
    start: int  # position of token_ids[0]; earlier positions are final in the cache
    block_table: torch.Tensor  # int32 row (host) covering positions 0..end-1
    forced: torch.Tensor | None = None  # [n] bool (CPU): always recompute; None = nothing forced
    num_outputs: int = 0  # the last k tokens (e.g. the question) are forced and get logits
    # Or: the last k tokens are the question as probes for query selection (the vLLM
    # connector, where vLLM computes the question itself): forced up to the last check
    # layer, then dropped; no logits. Their K/V writes there are provisional.
    num_probes: int = 0
    # Test-only (blend/faults.py): rows [lo, hi) of the chunk a `rope` fault shifts.
    fault_span: tuple[int, int] | None = None

    @property
    def end(self) -> int:
        return self.start + int(self.token_ids.numel())


@dataclass
class BlendTrace:
    """What a notebook needs to see a blend: deviations, selection and timings."""

    deviation: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    selected: list[torch.Tensor] = field(default_factory=list)  # per sequence, positions
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Context-token layer passes (attention + MLP), question rows excluded: `compute` share
    # = token_layers / (context tokens x layers). Probe passes count too.
    token_layers: int = 0
    # Keep the tensors on the device until `to_cpu()`: a `.cpu()` inside the blend syncs
    # the device mid-pass, and a traced blend would then no longer show the untraced
    # one's timing (the connector's worker writes its traces off the step, on CUDA).
    defer_cpu: bool = False

    def host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the CPU, or `t` itself (a private copy) until `to_cpu()` when deferred."""
        return t.clone() if self.defer_cpu else t.cpu()

    def to_cpu(self) -> None:
        """Move what a deferred trace holds to the CPU (after the device passed the blend)."""
        self.deviation = {k: (p.cpu(), d.cpu()) for k, (p, d) in self.deviation.items()}
        self.selected = [s.cpu() for s in self.selected]

    # The same per sequence of the run, in order (the connector's per-request trace reports
    # it, so a benchmark can measure each request's compute).
    seq_token_layers: list[int] = field(default_factory=list)

    def count(self, per_seq: Sequence[int]) -> None:
        """Add one layer's (or one probe pass's) context-token passes, per sequence."""
        if len(self.seq_token_layers) < len(per_seq):
            self.seq_token_layers += [0] * (len(per_seq) - len(self.seq_token_layers))
        for b, n in enumerate(per_seq):
            self.seq_token_layers[b] += int(n)
        self.token_layers += int(sum(per_seq))

    def deviation_dense(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Deviation at `layer` for positions `start..end-1` (NaN where not measured)."""
        pos, dev = self.deviation[layer]
        out = torch.full((end - start,), float("nan"))
        keep = (pos >= start) & (pos < end)
        out[pos[keep] - start] = dev[keep]
        return out


@dataclass
class RunOutput:
    selected: list[torch.Tensor]  # per sequence, positions still active after the last check
    logits: torch.Tensor | None  # [sum(num_outputs), vocab]: the output tokens, in order


class Blender:
    """Runs blends and plain prefills of token batches through a `ModelAdapter`."""

    def __init__(self, adapter: ModelAdapter, config: BlendConfig | None = None,
                 ops: BlendOps | None = None):
        self.adapter = adapter
        self.config = config or BlendConfig()
        self.config.check_model(adapter.num_layers)
        self.ops = ops or get_ops(self.config.attention_backend, adapter.device)
        self._cos_sin: torch.Tensor | None = None
        self.fault = active_fault()  # test-only (blend/faults.py); None in production
        self.graphs: LayerGraphs | None = None  # `use_graphs`: the steady layers' CUDA graphs

    def with_config(self, config: BlendConfig) -> Blender:
        """Same model and ops, other knobs (cheap: shares the RoPE table and the graphs)."""
        other = Blender(self.adapter, config, self.ops)
        other._cos_sin = self._cos_sin
        other.fault = self.fault
        other.graphs = self.graphs  # an engine's resource: a request's knobs do not change it
        return other

    def use_graphs(self, kv, max_blocks: int, buckets: Sequence[int] = BUCKETS
                   ) -> LayerGraphs | None:
        """Replay the steady layers of blends over `kv` from CUDA graphs (config `cuda_graphs`;
        captured lazily per bucket, or all at once by `capture_all`). Off CUDA the same
        static-input path runs eagerly (tests). None, logged, where they cannot run."""
        if not self.config.cuda_graphs:
            return None
        why = ("the triton backend only" if self.ops.name != "triton" else
               "one TP rank only" if getattr(self.adapter, "tp_size", 1) != 1 else None)
        if why is not None:
            logger.warning("cuda_graphs: %s (backend %s); the blend runs eagerly", why,
                           self.ops.name)
            return None
        self.graphs = LayerGraphs(self.adapter, self.ops, kv, max_blocks, buckets)
        return self.graphs

    def delta_table(self, max_delta: int) -> torch.Tensor:
        """Pure cos/sin rotation table for re-rotating chunks by up to `max_delta` positions."""
        from blend.triton_kernels.rope import delta_cos_sin

        if self._cos_sin is None or self._cos_sin.shape[0] <= max_delta:
            size = max(max_delta + 1, 2 * (0 if self._cos_sin is None else self._cos_sin.shape[0]),
                       4096)
            self._cos_sin = delta_cos_sin(self.adapter.rope.inv_freq.to(self.adapter.device),
                                          size - 1)
        return self._cos_sin

    @torch.inference_mode()
    def run(
        self,
        seqs: Sequence[BlendSeq],
        kv,
        *,
        blend: bool,
        trace: BlendTrace | None = None,
        layer_hook: Callable[[int], None] | None = None,
    ) -> RunOutput:
        """Blend (`blend=True`) or plainly prefill the tokens of `seqs` into the paged cache `kv`.

        `kv.layer(l)` gives the layer's K/V caches and `kv.block_size` their block size.
        `layer_hook(l)` runs before layer `l` reads the cache (e.g. waits for its load).
        Each sequence's last `num_outputs` tokens get logits; in a blend they are forced,
        so a question rides in the same pass as its context (exact, by causality).
        """
        started = time.perf_counter()
        forced = [s.forced if blend else None for s in seqs]
        plan = plan_run(self.config, [int(s.token_ids.numel()) for s in seqs],
                        [s.end for s in seqs], forced, [s.num_outputs for s in seqs],
                        [s.num_probes for s in seqs], blend=blend)
        rows = self._upload(seqs, plan, _forced_masks(forced, plan), kv.block_size, blend)
        if self.device.type == "cuda":
            _preload(plan, self.device)
        hooks = _LayerHooks(layer_hook)
        if plan.cheap:
            self._probe_select(plan, rows, kv, hooks, trace)
        logits = self._layers(plan, rows, kv, hooks, trace)
        hooks(self.adapter.num_layers - 1)  # an early stop still owes the later layers their load
        cu = plan.phase_cu[rows.phase]
        selected = [rows.pos[cu[b]:cu[b + 1]] for b in range(len(seqs))]
        if trace is not None:
            trace.selected = [trace.host(s) for s in selected]
            trace.timings_ms["blend" if blend else "prefill"] = (time.perf_counter() - started) * 1e3
        return RunOutput(selected=selected, logits=logits)

    @property
    def device(self) -> torch.device:
        return torch.device(self.adapter.device)

    def _upload(self, seqs: Sequence[BlendSeq], plan: RunPlan, forced: list[torch.Tensor],
                block_size: int, blend: bool) -> _ActiveRows:
        """The run's per-token device tensors (host metadata copied without a sync)."""
        dev = self.adapter.device
        ids = _h2d(torch.cat([s.token_ids.cpu() for s in seqs]), dev)
        pos = torch.cat([torch.arange(s.start, s.end, device=dev) for s in seqs])
        block_table = _h2d(_stack_rows([s.block_table for s in seqs]), dev)
        slots = torch.cat([slots_for(block_table[b], torch.arange(s.start, s.end, device=dev),
                                     block_size) for b, s in enumerate(seqs)])
        rows = _ActiveRows(block_table, ids, pos, slots, _h2d(torch.cat(forced), dev))
        if self.fault is not None and blend:  # test-only (blend/faults.py)
            spans = [s.fault_span for s in seqs]
            rows.fault, rows.fault_rows = self.fault, _h2d(fault_rows(self.fault, spans, forced), dev)
        return rows

    def _probe_select(self, plan: RunPlan, rows: _ActiveRows, kv, hooks, trace) -> None:
        """Cheap selection: the question alone runs over the cached KV up to the last check
        layer, and its attention there picks the rows recomputed from layer 0."""
        question = to_device(plan.probe_rows, self.device)
        mass = self._probe(rows.ids[question], rows.pos[question], rows.slots[question],
                           plan.question_cu, rows.block_table, plan.seq_lens, kv, hooks, trace)
        score = per_token(mass, rows.pos, plan.token_cu)
        keep = self.ops.select(score, rows.forced, plan.token_cu, plan.cheap_takes)
        if trace is not None:
            trace.deviation[max(self.config.check_layers)] = (trace.host(rows.pos),
                                                              trace.host(score.float()))
        if plan.rows_without_probes is not None:  # the probe pass was their only use
            keep = keep[to_device(plan.rows_without_probes, self.device)]
        rows.ids = rows.ids[keep]
        rows.keep(keep)

    def _layers(self, plan: RunPlan, rows: _ActiveRows, kv, hooks, trace) -> torch.Tensor | None:
        """The layer loop over the active rows; the output rows' logits, or None when the run
        has no outputs (or nothing left to recompute)."""
        adapter, ops, last = self.adapter, self.ops, self.adapter.num_layers - 1
        hidden = adapter.embed(rows.ids)
        q_pos = rows.pos.to(torch.int32)
        graphs = (self.graphs if self.graphs is not None and self.graphs.kv is kv
                  and rows.fault is None else None)
        steady, run = (plan.last_check + 1 if plan.takes else 0), None
        for layer in range(adapter.num_layers):
            if graphs is not None and layer == steady and layer < last:
                run = graphs.start(hidden, rows.rope_pos(), q_pos, rows.slots,
                                   plan.phase_cu[rows.phase], rows.block_table, plan.seq_lens)
            if run is not None and layer < last:  # same rows up to the last layer: replays
                hooks(layer)
                graphs.replay(run, layer)
                if trace is not None:
                    trace.count(plan.context_rows[rows.phase])
                if layer == last - 1:
                    hidden = run.output()
                continue
            hooks(layer)
            k_cache, v_cache = kv.layer(layer)
            q, k, v, hidden = adapter.qkv(layer, hidden, rows.rope_pos())
            fused = False
            if layer in plan.takes:
                keep, fused = self._check(plan, layer, rows, q, k, v, k_cache, v_cache, q_pos, trace)
                hidden, q, k, v = hidden[keep], q[keep], k[keep], v[keep]
                rows.keep(keep)
                q_pos = rows.pos.to(torch.int32)
                if plan.phase_cu[rows.phase][-1] == 0:
                    break  # nothing left to recompute: every later layer keeps its cached KV
            if not fused:
                ops.fuse_kv(k_cache, v_cache, rows.slots, k, v)
            if trace is not None:  # the last layer computes only K/V for context tokens: count it
                trace.count(plan.context_rows[rows.phase])
            q_cu = plan.phase_cu[rows.phase]
            if layer == last:
                # The last layer's output feeds only the logits: run it for the output tokens,
                # which are forced and so are the last `outputs[b]` active rows of each sequence.
                if not any(plan.outputs):
                    break
                out = to_device(plan.output_rows, self.device)
                hidden, q, q_pos, q_cu = hidden[out], q[out], q_pos[out], plan.output_cu
            # Dense: every position of each request is a query (before the first check, in a
            # plain prefill, or after checks that kept everything, as at r=1), or only its tail
            # (the output rows of the last layer).
            attend = ops.attend(plan.dense[rows.phase] or layer == last)
            attn = attend(q, k_cache, v_cache, rows.attn_pos(q_pos, layer != last), q_cu,
                          rows.block_table, plan.seq_lens, adapter.scale)
            hidden = adapter.finish_layer(layer, hidden, attn)
            if layer == last:
                return adapter.logits(hidden)
        return None

    def _check(self, plan: RunPlan, layer: int, rows: _ActiveRows, q, k, v, k_cache, v_cache,
               q_pos, trace) -> tuple[torch.Tensor, bool]:
        """A check layer: rank the active rows, keep the plan's share and enter the next phase.
        The kept rows, and whether their fresh K/V are already in the cache."""
        cu = plan.phase_cu[rows.phase]
        score, fused = self._check_scores(plan, layer, cu, rows, q, k, v, k_cache, v_cache, q_pos)
        keep = self.ops.select(score, rows.forced, cu, plan.takes[layer])
        if trace is not None:
            trace.deviation[layer] = (trace.host(rows.pos), trace.host(score.float()))
        rows.phase += 1
        if layer == plan.last_check and plan.rows_without_probes is not None:  # drop the probes
            keep = keep[to_device(plan.rows_without_probes, self.device)]
        return keep, fused

    def _probe(self, ids, pos, slots, cu, block_table, seq_lens, kv, hooks, trace):
        """The question alone over the cache up to the last check layer: per sequence, its
        attention mass on every key position, summed over the check layers.

        Its own K/V writes are provisional: the pass that follows (or vLLM, for the
        question) recomputes the question and overwrites them.
        """
        adapter, ops, checks = self.adapter, self.ops, self.config.check_layers
        q_pos = pos.to(torch.int32)
        hidden = adapter.embed(ids)
        total = None
        for layer in range(max(checks) + 1):
            hooks(layer)
            k_cache, v_cache = kv.layer(layer)
            q, k, v, hidden = adapter.qkv(layer, hidden, pos)
            ops.fuse_kv(k_cache, v_cache, slots, k, v)
            if layer in checks:
                mass = query_mass(q, q_pos, cu, k_cache, block_table, seq_lens, adapter.scale)
                total = mass if total is None else [t + m for t, m in zip(total, mass)]
            if layer == max(checks):
                break
            attn = ops.attend(True)(q, k_cache, v_cache, q_pos, cu, block_table, seq_lens,
                                    adapter.scale)
            hidden = adapter.finish_layer(layer, hidden, attn)
        if trace is not None:  # question rows run twice: the probe is extra work
            trace.count([(max(checks) + 1) * (cu[b + 1] - cu[b]) for b in range(len(cu) - 1)])
        return [adapter.reduce_scores(t) for t in total]

    def _check_scores(self, plan: RunPlan, layer: int, cu, rows: _ActiveRows, q, k, v, k_cache,
                      v_cache, q_pos) -> tuple[torch.Tensor, bool]:
        """Ranking score `[N]` of the active tokens at a check layer, and whether their fresh
        K/V are already in the cache (query scoring fuses them first, to read exact keys)."""
        adapter, ops, cfg = self.adapter, self.ops, self.config
        policy = cfg.selection
        deviation = None
        if policy != "query" or not plan.has_question:
            deviation = adapter.reduce_scores(ops.deviation(k, v, k_cache, v_cache, rows.slots,
                                                            cfg.deviation))
        if policy not in ("query", "hybrid") or not plan.has_question:
            return deviation, False  # no question in the pass (or cheap mode without one)
        # Every active token's fresh K/V is already computed here, and better than its cached
        # K/V (exact at the first check layer): write them all, not only the kept ones, so
        # the question reads the keys the kept tokens will see.
        ops.fuse_kv(k_cache, v_cache, rows.slots, k, v)
        question = to_device(plan.query_rows[layer], q.device)
        mass = query_mass(q[question], q_pos[question], plan.question_cu, k_cache,
                          rows.block_table, plan.seq_lens, adapter.scale)
        mass = adapter.reduce_scores(per_token(mass, q_pos.long(), cu))
        return combine(policy, deviation, mass, ~rows.forced, cu, cfg.query_weight), True


@dataclass
class _ActiveRows:
    """The run's per-token device tensors, narrowed to the active rows as checks keep fewer."""

    block_table: torch.Tensor
    ids: torch.Tensor  # read by the embedding (and the probe pass) only
    pos: torch.Tensor
    slots: torch.Tensor
    forced: torch.Tensor
    phase: int = 0  # index into the plan's per-phase sizes
    # Test-only (blend/faults.py): the fault's kind and +1 on the rows it hits.
    fault: str | None = None
    fault_rows: torch.Tensor | None = None

    def keep(self, keep: torch.Tensor) -> None:
        self.pos, self.slots, self.forced = self.pos[keep], self.slots[keep], self.forced[keep]
        self.fault_rows = None if self.fault_rows is None else self.fault_rows[keep]

    def rope_pos(self) -> torch.Tensor:
        """Positions RoPE rotates by (a `rope` fault: one too far on its rows)."""
        return self.pos + self.fault_rows if self.fault == "rope" else self.pos

    def attn_pos(self, q_pos: torch.Tensor, faultable: bool) -> torch.Tensor:
        """Query positions for the causal mask (a `mask` fault: one future key on its rows)."""
        if self.fault == "mask" and faultable:
            return q_pos + self.fault_rows.to(torch.int32)
        return q_pos


class _LayerHooks:
    """Runs each layer's hook once, in order, whoever asks first (probe pass or layer loop)."""

    def __init__(self, hook: Callable[[int], None] | None):
        self.hook, self.done = hook, -1

    def __call__(self, upto: int) -> None:
        if self.hook is not None:
            for layer in range(self.done + 1, upto + 1):
                self.hook(layer)
        self.done = max(self.done, upto)


def _forced_masks(forced: Sequence[torch.Tensor | None], plan: RunPlan) -> list[torch.Tensor]:
    """Each sequence's host mask of always-recomputed rows: its own, and its question."""
    masks = []
    for f, n, q in zip(forced, plan.lens, plan.question):
        mask = f.clone() if f is not None else torch.zeros(n, dtype=torch.bool)
        mask[n - q:] = True
        masks.append(mask)
    return masks


def _stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    width = max((int(r.numel()) for r in rows), default=0)
    table = torch.zeros((len(rows), max(width, 1)), dtype=torch.int32)
    for i, r in enumerate(rows):
        table[i, : r.numel()] = r.cpu().to(torch.int32)
    return table


def _preload(plan: RunPlan, device: torch.device) -> None:
    """Upload every small host list the run's layers will copy, before the first layer hook.

    The hook queues the chunk KV copies (gigabytes) on the host-to-device
    engine; a metadata copy issued after them would wait behind them, and its
    layer with it. `to_device` caches by value, so the layers' own calls find
    these tensors already on the device.
    """
    from blend.triton_kernels.deviation import preload_select

    for cu in (*plan.phase_cu, plan.output_cu):
        to_device(cu, device)
    to_device(plan.seq_lens, device)
    for layer, cu in zip(sorted(plan.takes), plan.phase_cu):
        preload_select(cu, plan.takes[layer], device)
    if plan.output_rows:
        to_device(plan.output_rows, device)
    if plan.cheap:
        preload_select(plan.token_cu, plan.cheap_takes, device)
    for rows in plan.preload_rows:
        to_device(rows, device)


def _h2d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host metadata to the device without a sync: a pageable copy would wait for the stream."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
