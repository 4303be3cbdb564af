"""Adapter for Hugging Face `transformers` decoder models of the Llama family.

Covers Llama (SmolLM2, Llama-3), Mistral, Qwen2 (q/k/v bias) and Qwen3
(per-head q/k RMSNorm before RoPE): they share the same module names.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .base import ModelAdapter, RopeSpec, UnsupportedModelError, check_rope_type

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class HFAdapter(ModelAdapter):
    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"model_type {cfg.model_type!r} is not supported; supported: {SUPPORTED}")
        self.model = model
        self.inner = model.model
        self.layers = self.inner.layers
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = float(attn.scaling)
        rot = self.inner.rotary_emb
        check_rope_type(rot.rope_type)
        self.rope = RopeSpec(inv_freq=rot.inv_freq.detach().float().clone(), is_neox=True,
                             rope_type=rot.rope_type)
        self._rotary = rot
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids)

    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        blk = self.layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(h)
        n = x.shape[0]
        q = attn.q_proj(x).view(n, self.num_q_heads, self.head_dim)
        k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._rotary(x[None], positions[None].long())  # [1, N, D], mscale folded in
        cos, sin = cos[0, :, None, :].to(q.dtype), sin[0, :, None, :].to(q.dtype)
        return _rotate_neox(q, cos, sin), _rotate_neox(k, cos, sin), v, h

    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        blk = self.layers[layer]
        h = h + blk.self_attn.o_proj(attn.reshape(attn.shape[0], self.num_q_heads * self.head_dim))
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.inner.norm(h))

    def identity(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model_id": getattr(cfg, "_name_or_path", "") or cfg.model_type,
            "revision": weights_digest(self.model),
            "dtype": str(self.dtype),
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope": {"type": self.rope.rope_type,
                     "inv_freq_sha": _tensor_digest(self.rope.inv_freq)},
        }


def _tensor_digest(t: torch.Tensor, limit: int | None = None) -> str:
    flat = t.detach().reshape(-1)
    if limit is not None:
        flat = flat[:limit]
    return hashlib.sha256(flat.cpu().float().numpy().tobytes()).hexdigest()[:16]


def weights_digest(model: torch.nn.Module, sample: int = 4096) -> str:
    """Cheap weights revision: a digest of a sample of every parameter (same weights, same id)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(_tensor_digest(p, sample).encode())
    return h.hexdigest()[:32]
