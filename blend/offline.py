"""Offline API on Hugging Face `transformers` models: notebooks, evaluation, GPU benchmarks.

`HFBlender(model, tokenizer).prefill(system, chunks, question, mode)` runs one
prompt three ways on the same code the vLLM connector uses:
`full` (plain prefill), `reuse` (chunk KV with the RoPE fix, nothing
recomputed) and `blend` (CacheBlend). The question is then prefilled over the
resulting cache, exactly as vLLM does after the connector has loaded it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from blend.blender import Blender, BlendSeq, BlendTrace
from blend.chunk_kv import compute_chunk_kv
from blend.chunk_placement import ChunkPlacement, layer_loader, load_all
from blend.config import BlendConfig
from blend.keys import chunk_key, model_fingerprint
from blend.kv import PagedKV, slots_for
from blend.models import adapter_for
from blend.prompt import PromptLayout, build_layout

Mode = Literal["blend", "full", "reuse"]
MODES = ("blend", "full", "reuse")


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [len(question tokens), vocab] float32
    selected: torch.Tensor  # recomputed context positions (blend); all (full); none (reuse)
    trace: BlendTrace
    layout: PromptLayout
    kv: PagedKV
    block_table: torch.Tensor
    missed_chunks: list[int]


class HFBlender:
    """CacheBlend on a `transformers` causal LM.

    Chunk KV is kept in memory per chunk key (or in `store`, a `blend.store`
    ChunkStore). `on_miss="compute"` computes a missing chunk's standalone KV
    and keeps it; `on_miss="recompute"` instead recomputes its tokens inside the
    blend (they are forced into the selection).
    """

    def __init__(self, model, tokenizer, *, cache_fuse_metadata: Mapping[str, Any] | None = None,
                 store=None, on_miss: Literal["compute", "recompute"] = "compute",
                 chat: bool = True, block_size: int = 16):
        if on_miss not in ("compute", "recompute"):
            raise ValueError(f"on_miss: {on_miss!r} not in ('compute', 'recompute')")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter_for(model)
        self.blender = Blender(self.adapter, BlendConfig.from_dict(cache_fuse_metadata))
        self.fingerprint = model_fingerprint(**self.adapter.identity())
        self.store = store
        self.on_miss = on_miss
        self.chat = chat
        self.block_size = block_size
        self._memory: dict[str, torch.Tensor] = {}

    # -- chunk KV ---------------------------------------------------------------------------
    def chunk_kv(self, token_ids: list[int], compute: bool = True) -> torch.Tensor | None:
        """Standalone KV of a chunk from memory, the store, or computed (then kept)."""
        key = chunk_key(self.fingerprint, token_ids)
        kv = self._memory.get(key)
        if kv is None and self.store is not None:
            kv = self.store.get(key)
            if kv is not None:
                kv = kv.to(self.adapter.device, self.adapter.dtype)
        if kv is None and compute:
            kv = compute_chunk_kv(self.blender, token_ids)
            if self.store is not None:
                self.store.put(key, kv.cpu())
        if kv is not None:
            self._memory[key] = kv
        return kv

    def precompute(self, chunks: list[str]) -> list[str]:
        """Compute and keep the standalone KV of each chunk text; returns their keys."""
        layout = build_layout(self.tokenizer, "", chunks, "", chat=self.chat)
        for ids in layout.chunks:
            self.chunk_kv(ids)
        return [chunk_key(self.fingerprint, ids) for ids in layout.chunks]

    # -- prefill ----------------------------------------------------------------------------
    def layout(self, system: str, chunks: list[str], question: str) -> PromptLayout:
        return build_layout(self.tokenizer, system, chunks, question, chat=self.chat)

    @torch.inference_mode()
    def prefill(self, system: str, chunks: list[str], question: str, mode: Mode = "blend",
                cache_fuse_metadata: Mapping[str, Any] | None = None, *,
                extra_tokens: int = 0) -> PrefillResult:
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} not in {MODES}")
        blender = self.blender if cache_fuse_metadata is None else \
            self.blender.with_config(BlendConfig.from_dict(cache_fuse_metadata))
        cfg = blender.config
        layout = self.layout(system, chunks, question)
        ctx = layout.context_len
        total = len(layout.token_ids) + extra_tokens
        kv = PagedKV.like(self.adapter, total, self.block_size)
        row = kv.allocate(total)
        dev = self.adapter.device
        ids = torch.tensor(layout.token_ids, dtype=torch.long)
        trace = BlendTrace()
        segments = [(0, layout.prefix)] + list(zip((s for s, _ in layout.spans), layout.chunks))
        missed: list[int] = []

        nq = len(layout.suffix)
        t0 = time.perf_counter()
        if mode == "full":
            out = blender.run([BlendSeq(ids, 0, row, num_outputs=nq)], kv, blend=False, trace=trace)
        else:
            placements, forced = [], torch.zeros(len(ids), dtype=torch.bool)
            for i, (start, seg) in enumerate(segments):
                if not seg:
                    continue
                kv_i = self.chunk_kv(seg, compute=self.on_miss == "compute")
                if kv_i is None:
                    missed.append(i)
                    forced[start:start + len(seg)] = True
                    continue
                slots = slots_for(row.to(dev), torch.arange(start, start + len(seg), device=dev),
                                  kv.block_size)
                placements.append(ChunkPlacement(kv_i, slots, start))
                if cfg.sink_tokens and i > 0:
                    forced[start:start + min(cfg.sink_tokens, len(seg))] = True
            trace.timings_ms["lookup"] = (time.perf_counter() - t0) * 1e3
            if mode == "reuse" and not missed:
                load_all(blender, kv, placements)
                out = blender.run([BlendSeq(ids[ctx:], ctx, row, num_outputs=nq)], kv, blend=False)
            else:
                # Reuse with missed chunks degenerates to a blend that recomputes only those.
                if mode == "reuse":
                    blender = blender.with_config(BlendConfig(
                        recomp_ratio=0.0, check_layers=cfg.check_layers, deviation=cfg.deviation,
                        attention_backend=cfg.attention_backend))
                # The question rides in the blend pass as forced output tokens.
                out = blender.run([BlendSeq(ids, 0, row, forced, num_outputs=nq)], kv, blend=True,
                                  trace=trace, layer_hook=layer_loader(blender, kv, placements))
        selected = out.selected[0]
        selected = selected[selected < ctx].cpu()
        trace.selected = [selected]
        trace.timings_ms["prefill"] = (time.perf_counter() - t0) * 1e3
        return PrefillResult(logits=out.logits.float(), selected=selected, trace=trace,
                             layout=layout, kv=kv, block_table=row, missed_chunks=missed)

    @torch.inference_mode()
    def generate(self, system: str, chunks: list[str], question: str, mode: Mode = "blend",
                 max_new_tokens: int = 32,
                 cache_fuse_metadata: Mapping[str, Any] | None = None) -> list[int]:
        """Greedy continuation after the prefill, decoding over the same (fused) cache."""
        res = self.prefill(system, chunks, question, mode, cache_fuse_metadata,
                           extra_tokens=max_new_tokens)
        return self.decode(res, max_new_tokens)

    @torch.inference_mode()
    def decode(self, res: PrefillResult, max_new_tokens: int = 32) -> list[int]:
        """Greedy tokens after a prefill made with `extra_tokens >= max_new_tokens`."""
        eos = self.tokenizer.eos_token_id
        out: list[int] = []
        nxt = int(res.logits[-1].argmax())
        pos = len(res.layout.token_ids)
        while len(out) < max_new_tokens:
            out.append(nxt)
            if nxt == eos or len(out) == max_new_tokens:
                break
            step = self.blender.run([BlendSeq(torch.tensor([nxt]), pos, res.block_table,
                                              num_outputs=1)], res.kv, blend=False)
            nxt = int(step.logits[-1].argmax())
            pos += 1
        return out
