"""Selected-token attention with vLLM's FlashAttention 3 doing the bulk of the keys.

Flash attention has no mask "key position <= query position" for queries at
arbitrary positions, but it needs none for most of the work: every key up to a
tile's first query position is seen by every query of the tile. So each tile
of the Triton kernel becomes one varlen sequence for FA3 with
`seqused_k = first position + 1` and no mask, with its own copy of the
request's block-table row; the Triton kernel then attends the masked band
behind it and merges the two softmax states (`selected_attention(prefix=)`).
A phase whose queries are every position of each request (the layers before
the first check, a plain prefill) is one causal FA3 call: its bottom-right
aligned mask is exact there.

The reference is `attention.selected_attention_ref`; `prefix_attention_ref`
stands in for the FA3 half where FA3 is absent (CPU tests).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .attention import prefix_tiles, selected_attention, tile_tokens
from .paged import to_device


@functools.cache
def flash_varlen():
    """vLLM's FA3 varlen entry point, or None (no vLLM CUDA build, not Hopper, ...)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        if not torch.cuda.is_available() or not is_fa_version_supported(3):
            return None
        return flash_attn_varlen_func
    except Exception:  # any import failure means: no flash here
        return None


class _TileCache:
    """The FA3 metadata of one phase (the same `q_pos` for all its layers), kept once.

    Holding `q_pos` itself makes the identity test safe: its id cannot be reused.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple | None = None

    def get(self, q_pos, cu_q, block_table, tok):
        key = (q_pos, block_table, tuple(cu_q), tok)
        k = self.key
        if k is not None and k[0] is q_pos and k[1] is block_table and k[2:] == key[2:]:
            return self.value
        cu, req = prefix_tiles(list(cu_q), tok)
        dev = q_pos.device
        starts = to_device(cu[:-1], dev)
        seqused = (q_pos.index_select(0, starts) + 1).to(torch.int32)
        table = block_table.index_select(0, to_device(req, dev))
        self.key, self.value = key, (to_device(cu, dev, torch.int32), seqused, table)
        return self.value


_tiles = _TileCache()


def flash_dense_attention(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens, scale):
    """`flash_selected_attention` for a phase whose queries are every position (see there)."""
    return flash_selected_attention(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens,
                                    scale, dense=True)


def flash_selected_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    cu_q: Sequence[int],
    block_table: torch.Tensor,
    seq_lens: Sequence[int],
    scale: float,
    dense: bool = False,
) -> torch.Tensor:
    """`selected_attention_ref`'s result, FA3 over the unmasked keys, Triton over the band.

    `dense=True` promises that request b's queries are its last `cu_q[b+1]-cu_q[b]`
    positions, all of them (then one causal FA3 call is exact). Falls back to the
    Triton kernel where FA3 cannot run (no FA3, fp32, device-side sizes).
    """
    fa = flash_varlen()
    if (fa is None or q.dtype not in (torch.float16, torch.bfloat16)
            or isinstance(cu_q, torch.Tensor) or isinstance(seq_lens, torch.Tensor)
            or q.shape[0] == 0 or k_cache.stride(-1) != 1 or k_cache.stride(-2) != q.shape[-1]):
        return selected_attention(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens, scale)
    dev = q.device
    out = torch.empty_like(q)
    max_k = max(seq_lens)
    if dense:
        n = [cu_q[b + 1] - cu_q[b] for b in range(len(seq_lens))]
        fa(q, k_cache, v_cache, max(n), to_device(cu_q, dev, torch.int32), max_k,
           seqused_k=to_device(seq_lens, dev, torch.int32), softmax_scale=scale, causal=True,
           block_table=block_table, out=out, fa_version=3)
        return out
    tok = tile_tokens(q.shape[1], k_cache.shape[2], q.shape[2])
    cu_t, seqused, table = _tiles.get(q_pos, cu_q, block_table, tok)
    _, lse = fa(q, k_cache, v_cache, tok, cu_t, max_k, seqused_k=seqused, softmax_scale=scale,
                causal=False, block_table=table, return_softmax_lse=True, out=out, fa_version=3)
    return selected_attention(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens, scale,
                              out=out, prefix=(out, lse))
