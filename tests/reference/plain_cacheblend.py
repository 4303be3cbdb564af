"""Plain CacheBlend in a page of PyTorch: the independent yardstick for `blend.Blender`.

Dense tensors, the `transformers` Llama/Qwen2 modules called one by one, no
paging, no adapters, no kernels, nothing imported from `blend`. Chunk KV is
computed by running each chunk alone through the HF model from position 0; K is
moved to its new offset with HF's own rotary embedding (R(p + d) = R(d) R(p)).
The question is always recomputed and gets the logits. V deviation L2² at the
check layers, an exact causal mask by position, fp32.

Used by `tests/test_blend_vs_plain.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@torch.no_grad()
def standalone_kv(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) of the chunk run alone at positions 0..n-1: [n, Hkv, D], K post-RoPE."""
    out = model(torch.tensor([ids]), use_cache=True)
    cache = out.past_key_values
    return [(cache.layers[i].keys[0].transpose(0, 1).clone(),
             cache.layers[i].values[0].transpose(0, 1).clone())
            for i in range(len(cache.layers))]


@torch.no_grad()
def plain_blend(model, prefix: list[int], chunks: list[list[int]], question: list[int],
                ratios: tuple[float, ...] = (0.15,), check_layers: tuple[int, ...] = (1,)
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits over the question tokens [q, vocab], selected context positions).

    One ratio per check layer (gradual filtering): at check layer i the top
    `ceil(ratios[i] * context)` cached tokens by V deviation stay computed.
    """
    m = model.model
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    pieces = [prefix, *chunks] if prefix else list(chunks)
    ctx = [t for p in pieces for t in p]
    ids = torch.tensor(ctx + question)
    n_ctx, n = len(ctx), len(ctx) + len(question)
    pos = torch.arange(n)
    cos_all, sin_all = m.rotary_emb(torch.zeros(1), pos[None])
    cos_all, sin_all = cos_all[0], sin_all[0]  # [n, D]

    # Cached context KV: each piece alone, K moved from 0..len-1 to its offset.
    layers = len(m.layers)
    k_cache = torch.zeros(layers, n, hkv, d)
    v_cache = torch.zeros(layers, n, hkv, d)
    at = 0
    for p in pieces:
        kv = standalone_kv(model, p)
        c, s = m.rotary_emb(torch.zeros(1), torch.full((1, len(p)), at))
        c, s = c[0][:, None, :], s[0][:, None, :]
        for li, (k, v) in enumerate(kv):
            k_cache[li, at:at + len(p)] = k * c + _rotate_half(k) * s
            v_cache[li, at:at + len(p)] = v
        at += len(p)

    active = torch.arange(n)  # positions still computed
    forced = torch.zeros(n, dtype=torch.bool)
    forced[n_ctx:] = True
    budget = {li: math.ceil(r * n_ctx) for li, r in zip(check_layers, ratios)}
    h = m.embed_tokens(ids[None])[0]
    first = min(check_layers)
    for li, layer in enumerate(m.layers):
        att = layer.self_attn
        x = layer.input_layernorm(h)
        q = att.q_proj(x).view(-1, hq, d)
        k = att.k_proj(x).view(-1, hkv, d)
        v = att.v_proj(x).view(-1, hkv, d)
        c, s = cos_all[active][:, None, :], sin_all[active][:, None, :]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        if li in check_layers:
            dev = ((v - v_cache[li, active]) ** 2).sum((1, 2))
            dev[forced[active]] = float("inf")
            keep = dev.topk(min(len(active), budget[li] + int(forced.sum()))).indices.sort().values
            active, q, k, v, h = active[keep], q[keep], k[keep], v[keep], h[keep]
        kl, vl = k_cache[li].clone(), v_cache[li].clone()
        if li < first:  # full recompute: every token's KV is fresh
            kl, vl = k, v
        else:
            kl[active], vl[active] = k, v
        kl = kl.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [hq, n, d]
        vl = vl.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        mask = pos[None, :] <= active[:, None]  # exact causal mask by position
        o = F.scaled_dot_product_attention(q.transpose(0, 1), kl, vl, attn_mask=mask)
        h = h + att.o_proj(o.transpose(0, 1).reshape(len(active), hq * d))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(m.norm(h[-len(question):]))
    return logits, active[active < n_ctx]
