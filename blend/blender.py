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

from blend.attention import BlendOps, get_ops
from blend.config import BlendConfig, num_recompute
from blend.faults import active as active_fault
from blend.faults import fault_rows
from blend.kv import slots_for
from blend.models.base import ModelAdapter
from blend.selection import combine, per_token, query_mass
from blend.triton_kernels._paged import to_device


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

    def with_config(self, config: BlendConfig) -> Blender:
        """Same model and ops, other knobs (cheap: shares the RoPE table)."""
        other = Blender(self.adapter, config, self.ops)
        other._cos_sin = self._cos_sin
        other.fault = self.fault
        return other

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
        a, ops, cfg = self.adapter, self.ops, self.config
        dev = a.device
        device = torch.device(dev)
        t0 = time.perf_counter()
        lens = [int(s.token_ids.numel()) for s in seqs]
        cu = _cumsum(lens)
        ids = _h2d(torch.cat([s.token_ids.cpu() for s in seqs]), dev)
        pos = torch.cat([torch.arange(s.start, s.end, device=dev) for s in seqs])
        block_table = _h2d(_stack_rows([s.block_table for s in seqs]), dev)
        slots = torch.cat([slots_for(block_table[b], torch.arange(s.start, s.end, device=dev),
                                     kv.block_size) for b, s in enumerate(seqs)])
        seq_lens = [s.end for s in seqs]
        outs = [min(s.num_outputs, n) for s, n in zip(seqs, lens)]
        probes = [min(s.num_probes, n - o) if blend else 0 for s, n, o in zip(seqs, lens, outs)]
        # The question: the forced rows at the end that query selection reads.
        qrows = [o + p for o, p in zip(outs, probes)]

        checks = dict(zip(cfg.check_layers, cfg.ratios())) if blend else {}
        forced_host = []
        for s, n, q in zip(seqs, lens, qrows):
            f = s.forced.clone() if (blend and s.forced is not None) else torch.zeros(n, dtype=torch.bool)
            f[n - q:] = True
            forced_host.append(f)
        n_forced = [int(f.sum()) for f in forced_host]
        n_cached = [n - f for n, f in zip(lens, n_forced)]
        forced = _h2d(torch.cat(forced_host), dev)
        # Test-only fault (blend/faults.py): +1 on the rows whose RoPE or mask it breaks.
        bad = None
        if self.fault is not None and blend:
            spans = [s.fault_span for s in seqs]
            bad = _h2d(fault_rows(self.fault, spans, forced_host), dev)
        # No full-token check layer in the cheap mode: a probe pass of the question picks
        # the recomputed set before layer 0 (below), and nothing is filtered after.
        cheap = blend and cfg.selection == "cheap" and any(qrows)
        cheap_take = [nf + num_recompute(cfg.recomp_ratio, nc) for nf, nc in zip(n_forced, n_cached)]
        if cheap:
            checks = {}
        # Every layer's sizes are known here, from host metadata alone.
        start_cu = cu
        drop_rows = None  # rows kept when the probes are dropped (after the last check)
        rows_ahead: list[list[int]] = []  # the query rows the layers will index
        if cheap:
            rows_ahead.append(_tail_rows(cu, qrows))
            start_cu = _cumsum([min(t, n) for t, n in zip(cheap_take, lens)])
            if any(probes):
                drop_rows = _kept_rows(start_cu, probes)
                start_cu = _cumsum(_tail_dropped(start_cu, probes))
        takes, phase_cu = {}, [start_cu]
        for layer in sorted(checks):
            c = phase_cu[-1]
            if cfg.selection in ("query", "hybrid") and any(qrows):
                rows_ahead.append(_tail_rows(c, qrows))
            takes[layer] = [nf + num_recompute(checks[layer], nc)
                            for nf, nc in zip(n_forced, n_cached)]
            c = _cumsum([min(t, c[b + 1] - c[b]) for b, t in enumerate(takes[layer])])
            if layer == max(checks) and any(probes):  # probes: no use past the last check
                drop_rows = _kept_rows(c, probes)
                c = _cumsum(_tail_dropped(c, probes))
            phase_cu.append(c)
        if drop_rows is not None:
            rows_ahead.append(drop_rows)
        final = phase_cu[-1]
        out_rows = [i for b, o in enumerate(outs) for i in range(final[b + 1] - o, final[b + 1])]
        if device.type == "cuda":
            _preload(dev, phase_cu, takes, seq_lens, out_rows, _cumsum(outs))
            if cheap:
                from blend.triton_kernels.deviation import preload_select

                preload_select(cu, cheap_take, device)
            for r in rows_ahead:
                to_device(r, device)

        hooked = [-1]

        def hook(upto: int) -> None:  # each layer's hook runs once, in order, whoever asks first
            if layer_hook is not None:
                for j in range(hooked[0] + 1, upto + 1):
                    layer_hook(j)
            hooked[0] = max(hooked[0], upto)

        if cheap:
            # The question alone runs over the cached KV up to the last check layer, and its
            # attention there picks the tokens recomputed from layer 0.
            rows = to_device(_tail_rows(cu, qrows), device)
            mass = self._probe(ids[rows], pos[rows], slots[rows], _cumsum(qrows), block_table,
                               seq_lens, kv, hook, trace)
            score = per_token(mass, pos, cu)
            keep = ops.select(score, forced, cu, cheap_take)
            if trace is not None:
                trace.deviation[max(cfg.check_layers)] = (trace.host(pos), trace.host(score.float()))
            ids, pos, slots, forced = ids[keep], pos[keep], slots[keep], forced[keep]
            bad = None if bad is None else bad[keep]
            if drop_rows is not None:  # the probe pass was their only use
                rows = to_device(drop_rows, device)
                ids, pos, slots, forced = ids[rows], pos[rows], slots[rows], forced[rows]
                bad = None if bad is None else bad[rows]
                qrows = outs
        h = a.embed(ids)
        act_pos, act_slots, act_forced, act_cu = pos, slots, forced, start_cu
        q_pos = act_pos.to(torch.int32)
        last = a.num_layers - 1
        logits = None
        phase = 0
        for layer in range(a.num_layers):
            hook(layer)
            k_cache, v_cache = kv.layer(layer)
            rope_pos = act_pos if bad is None or self.fault != "rope" else act_pos + bad
            q, k, v, h = a.qkv(layer, h, rope_pos)
            fused = False
            if layer in checks:
                d, fused = self._check_scores(q, k, v, k_cache, v_cache, act_slots, q_pos, act_cu,
                                              act_forced, qrows, block_table, seq_lens)
                keep = ops.select(d, act_forced, act_cu, takes[layer])
                if trace is not None:
                    trace.deviation[layer] = (trace.host(act_pos), trace.host(d.float()))
                phase += 1
                act_cu = phase_cu[phase]
                if layer == max(checks) and drop_rows is not None:  # drop the probes
                    keep = keep[to_device(drop_rows, device)]
                    qrows = outs
                h, q, k, v = h[keep], q[keep], k[keep], v[keep]
                act_pos, act_slots, act_forced = act_pos[keep], act_slots[keep], act_forced[keep]
                bad = None if bad is None else bad[keep]
                q_pos = act_pos.to(torch.int32)
                if act_cu[-1] == 0:
                    break  # nothing left to recompute: every later layer keeps its cached KV
            if not fused:
                ops.fuse_kv(k_cache, v_cache, act_slots, k, v)
            if trace is not None:  # the last layer computes only K/V for context tokens: count it
                trace.count([act_cu[b + 1] - act_cu[b] - qrows[b] for b in range(len(seqs))])
            if layer == last:
                # The last layer's output feeds only the logits: run it for the output tokens,
                # which are forced and so are the last `outs[b]` active tokens of each sequence.
                if not any(outs):
                    break
                rows = to_device(out_rows, device)
                h, q, q_pos, q_cu = h[rows], q[rows], q_pos[rows], _cumsum(outs)
            else:
                q_cu = act_cu
            attn_pos = q_pos
            if bad is not None and self.fault == "mask" and layer != last:
                attn_pos = q_pos + bad.to(torch.int32)  # sees one future key
            # Dense: every position of each request is a query (before the first check, in a
            # plain prefill, or after checks that kept everything, as at r=1), or only its tail
            # (the output rows of the last layer).
            dense = act_cu == cu or layer == last
            o = ops.attend(dense)(q, k_cache, v_cache, attn_pos, q_cu, block_table, seq_lens,
                                  a.scale)
            h = a.finish_layer(layer, h, o)
            if layer == last:
                logits = a.logits(h)
        hook(a.num_layers - 1)  # an early stop still owes the later layers their load
        selected = [act_pos[act_cu[b]:act_cu[b + 1]] for b in range(len(seqs))]
        if trace is not None:
            trace.selected = [trace.host(s) for s in selected]
            trace.timings_ms["blend" if blend else "prefill"] = (time.perf_counter() - t0) * 1e3
        return RunOutput(selected=selected, logits=logits)

    def _probe(self, ids, pos, slots, cu, block_table, seq_lens, kv, hook, trace):
        """The question alone over the cache up to the last check layer: per sequence, its
        attention mass on every key position, summed over the check layers.

        Its own K/V writes are provisional: the pass that follows (or vLLM, for the
        question) recomputes the question and overwrites them.
        """
        a, ops = self.adapter, self.ops
        q_pos = pos.to(torch.int32)
        h = a.embed(ids)
        total = None
        for layer in range(max(self.config.check_layers) + 1):
            hook(layer)
            k_cache, v_cache = kv.layer(layer)
            q, k, v, h = a.qkv(layer, h, pos)
            ops.fuse_kv(k_cache, v_cache, slots, k, v)
            if layer in self.config.check_layers:
                mass = query_mass(q, q_pos, cu, k_cache, block_table, seq_lens, a.scale)
                total = mass if total is None else [t + m for t, m in zip(total, mass)]
            if layer == max(self.config.check_layers):
                break
            h = a.finish_layer(layer, h, ops.attend(True)(q, k_cache, v_cache, q_pos, cu,
                                                          block_table, seq_lens, a.scale))
        if trace is not None:  # question rows run twice: the probe is extra work
            trace.count([(max(self.config.check_layers) + 1) * (cu[b + 1] - cu[b])
                         for b in range(len(cu) - 1)])
        return [a.reduce_scores(t) for t in total]

    def _check_scores(self, q, k, v, k_cache, v_cache, slots, q_pos, cu, forced, qrows,
                      block_table, seq_lens) -> tuple[torch.Tensor, bool]:
        """Ranking score `[N]` of the active tokens at a check layer, and whether their fresh
        K/V are already in the cache (query scoring fuses them first, to read exact keys)."""
        a, ops, cfg = self.adapter, self.ops, self.config
        policy = cfg.selection
        dev = None
        if policy != "query" or not any(qrows):
            dev = a.reduce_scores(ops.deviation(k, v, k_cache, v_cache, slots, cfg.deviation))
        if policy not in ("query", "hybrid") or not any(qrows):
            return dev, False  # no question in the pass (or cheap mode without one): deviation
        # Every active token's fresh K/V is already computed here, and better than its cached
        # K/V (exact at the first check layer): write them all, not only the kept ones, so
        # the question reads the keys the kept tokens will see.
        ops.fuse_kv(k_cache, v_cache, slots, k, v)
        rows = to_device(_tail_rows(cu, qrows), q.device)
        mass = query_mass(q[rows], q_pos[rows], _cumsum(qrows), k_cache, block_table, seq_lens,
                          a.scale)
        mass = a.reduce_scores(per_token(mass, q_pos.long(), cu))
        return combine(policy, dev, mass, ~forced, cu, cfg.query_weight), True


def _tail_rows(cu: Sequence[int], tail: Sequence[int]) -> list[int]:
    """Row indexes of the last `tail[b]` rows of each sequence (the question)."""
    return [i for b, t in enumerate(tail) for i in range(cu[b + 1] - t, cu[b + 1])]


def _kept_rows(cu: Sequence[int], tail: Sequence[int]) -> list[int]:
    """Row indexes of each sequence without its last `tail[b]` rows (probes dropped)."""
    return [i for b, t in enumerate(tail) for i in range(cu[b], cu[b + 1] - t)]


def _tail_dropped(cu: Sequence[int], tail: Sequence[int]) -> list[int]:
    return [cu[b + 1] - cu[b] - t for b, t in enumerate(tail)]


def _cumsum(xs: Sequence[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    width = max((int(r.numel()) for r in rows), default=0)
    table = torch.zeros((len(rows), max(width, 1)), dtype=torch.int32)
    for i, r in enumerate(rows):
        table[i, : r.numel()] = r.cpu().to(torch.int32)
    return table


def _preload(dev, phase_cu, takes, seq_lens, out_rows, out_cu) -> None:
    """Upload every small host tensor the run's layers will copy, before the first layer hook.

    The hook queues the chunk KV copies (gigabytes) on the host-to-device
    engine; a metadata copy issued after them would wait behind them, and its
    layer with it. `to_device` caches by value, so the layers' own calls find
    these tensors already on the device.
    """
    from blend.triton_kernels.deviation import preload_select

    device = torch.device(dev)
    for c in (*phase_cu, out_cu):
        to_device(c, device)
    to_device(seq_lens, device)
    for layer, c in zip(sorted(takes), phase_cu):
        preload_select(c, takes[layer], device)
    if out_rows:
        to_device(out_rows, device)


def _h2d(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host metadata to the device without a sync: a pageable copy would wait for the stream."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
