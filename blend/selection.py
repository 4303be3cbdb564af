"""Which cached tokens a check layer keeps recomputing: the `selection` policy.

CacheBlend ranks cached tokens by how far their fresh K/V deviate from the
cached K/V (`deviation`). A RAG prompt ends with its question, and the blend
pass carries the question as forced tokens, so a check layer also sees how
much the question attends to each context token (`query`). `hybrid` combines
the two: a token matters when its cached KV is wrong *and* the question reads
it. Scores here are plain PyTorch (the reference); every size comes from host
metadata, so nothing syncs the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blend.triton_kernels.paged import gather_tokens


def query_mass(
    q_rows: torch.Tensor,
    q_pos: torch.Tensor,
    cu_rows: Sequence[int],
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: Sequence[int],
    scale: float,
) -> list[torch.Tensor]:
    """Per sequence, `[seq_lens[b]]` fp32: the question's attention mass on each key position.

    `q_rows[cu_rows[b]:cu_rows[b+1]]` are sequence b's question queries at positions
    `q_pos`; keys are the first `seq_lens[b]` tokens of the paged `k_cache`. Softmax
    per head and query with the exact causal mask by position, then summed over
    heads and queries, so each query contributes the same total mass.
    """
    hq, hkv = q_rows.shape[1], k_cache.shape[2]
    out = []
    for b, n in enumerate(seq_lens):
        lo, hi = cu_rows[b], cu_rows[b + 1]
        if hi == lo:
            out.append(torch.zeros(n, dtype=torch.float32, device=q_rows.device))
            continue
        k = gather_tokens(k_cache, block_table[b], n).float()  # [n, Hkv, D]
        qb = q_rows[lo:hi].float().reshape(hi - lo, hkv, hq // hkv, -1)  # [nq, Hkv, G, D]
        logits = torch.einsum("qhgd,khd->hgqk", qb, k) * scale
        mask = q_pos[lo:hi, None].long() >= torch.arange(n, device=k.device)[None, :]
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        out.append(probs.sum((0, 1, 2)))
    return out


def per_token(values: Sequence[torch.Tensor], act_pos: torch.Tensor,
              cu: Sequence[int]) -> torch.Tensor:
    """Per-position scores of each sequence, read at the active tokens' positions `[N]`."""
    return torch.cat([values[b][act_pos[cu[b]:cu[b + 1]]] for b in range(len(values))]) \
        if values else act_pos.new_zeros(0, dtype=torch.float32)


def normalized(x: torch.Tensor, cached: torch.Tensor, cu: Sequence[int]) -> torch.Tensor:
    """`x` divided by its mean over each sequence's cached (not forced) tokens.

    Deviation and attention mass live on different scales that also change from
    prompt to prompt; dividing by the per-sequence mean makes them comparable.
    """
    out = []
    for b in range(len(cu) - 1):
        xb, cb = x[cu[b]:cu[b + 1]].float(), cached[cu[b]:cu[b + 1]]
        mean = (xb * cb).sum() / cb.sum().clamp(min=1)
        out.append(xb / mean.clamp(min=1e-30))
    return torch.cat(out) if out else x.float()


def combine(policy: str, dev: torch.Tensor | None, mass: torch.Tensor | None,
            cached: torch.Tensor, cu: Sequence[int], weight: float) -> torch.Tensor:
    """The ranking score of a policy from deviation and/or query mass (both `[N]`)."""
    if policy == "deviation":
        return dev
    if policy == "query":
        return mass
    # hybrid: normalized deviation plus `weight` x normalized question attention.
    return normalized(dev, cached, cu) + weight * normalized(mass, cached, cu)
