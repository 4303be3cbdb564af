"""Selected-token attention through vLLM's own CPU attention kernel.

Why: `recomp_ratio=1.0` must reproduce plain vLLM token for token. With a
different attention kernel (SDPA) the blended context KV differs from
vLLM's in the last bf16 bit, and greedy decoding flips on near-ties. vLLM's
CPU kernel computes each query row over its keys in block order,
independently of how queries are grouped, so calling it the way a chunked
prefill would gives the very KV vLLM computes.

How the exact causal mask by position is kept: the active query positions of
a sequence are split into maximal runs of consecutive positions; each run
`[a, b)` becomes one pseudo-request with `q_len = b - a` and `seq_len = b`
on the sequence's block table. vLLM's causal mask is bottom-right aligned,
which for a run ending at `b` is exactly "position p sees keys <= p".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from blend.ops import BlendOps, get_ops


def _runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row offset, first position, length) of each run of consecutive positions."""
    p = pos.tolist()
    out, start = [], 0
    for i in range(1, len(p) + 1):
        if i == len(p) or p[i] != p[i - 1] + 1:
            out.append((start, p[start], i - start))
            start = i
    return out


class VllmCpuAttention:
    """`selected_attention` with the reference signature, on vLLM's CPU kernel."""

    def __init__(self, raw: dict[int, torch.Tensor], isa: str, num_heads: int,
                 num_kv_heads: int, head_dim: int, block_size: int) -> None:
        self.raw = raw  # data_ptr of a layer's K view -> that layer's raw cache tensor
        self.isa, self.block_size = isa, block_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 q_pos: torch.Tensor, cu_q: Sequence[int], block_table: torch.Tensor,
                 seq_lens: Sequence[int], scale: float) -> torch.Tensor:
        from vllm import _custom_ops as ops
        from vllm import envs

        kv = self.raw.get(k_cache.data_ptr())
        if kv is None:  # not vLLM's cache (e.g. a chunk computed alone in a scratch cache)
            return get_ops("torch").attention(q, k_cache, v_cache, q_pos, cu_q, block_table,
                                              seq_lens, scale)
        nb, h, bs, _ = kv.shape
        key_cache, value_cache = kv.view(nb, h, 2 * bs, -1).chunk(2, dim=2)
        rows, starts, ends, tables = [], [0], [], []
        for b in range(len(seq_lens)):
            lo, hi = cu_q[b], cu_q[b + 1]
            for off, first, n in _runs(q_pos[lo:hi]):
                rows.append(torch.arange(lo + off, lo + off + n))
                starts.append(starts[-1] + n)
                ends.append(first + n)
                tables.append(block_table[b])
        out = torch.empty_like(q)
        if not rows:
            return out
        order = torch.cat(rows)
        query = q[order].contiguous()
        qsl = torch.tensor(starts, dtype=torch.int32)
        seq = torch.tensor(ends, dtype=torch.int32)
        table = torch.stack(tables).to(torch.int32).contiguous()
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(ends), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq, dtype=q.dtype, query_start_loc=qsl,
            causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)  # as vLLM builds it
        res = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=res,
            query_start_loc=qsl, seq_lens=seq, scale=scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=table, softcap=0, scheduler_metadata=meta,
            s_aux=None)
        out[order] = res
        return out


def vllm_cpu_ops(attention: VllmCpuAttention) -> BlendOps:
    """The torch reference ops with attention swapped for vLLM's CPU kernel."""
    return replace(get_ops("torch"), name="vllm_cpu", attention=attention)
