"""Adapter for vLLM's loaded Llama-family models (Llama, Mistral, Qwen2, Qwen3).

It runs vLLM's own modules (qkv_proj, rotary_emb, o_proj, mlp, norms) so the
K/V it produces are bit-identical to what vLLM's forward writes, but never
vLLM's `Attention` op (that needs vLLM's per-step forward context): the
blender does attention itself.

The residual stream is carried the way vLLM carries it, as a pair
(hidden, residual) fused by `RMSNorm(x, residual)`, and packed into one
tensor `[N, 2 * hidden_size]` so it can pass through the blender's single
`h` (which only ever selects rows of it). Re-associating the residual sum
instead would round differently from vLLM and break the `recomp_ratio=1.0`
exactness against plain vLLM.

On CUDA the blend runs eagerly, outside vLLM's compiled graph, where vLLM's
norms, rotary and SiluAndMul fall back to their native (or per-call
torch.compile'd) forms: a dozen small launches each. There the adapter calls
vLLM's fused CUDA ops instead (`_C.rms_norm`, `_C.fused_add_rms_norm`,
`_C.silu_and_mul`, `rotary_emb.forward_cuda`), one launch each, and `qkv`
hands the residual sum to `finish_layer` instead of folding it twice. These
are the kernels vLLM runs when its custom ops are on; they round the
residual sum to the model dtype before the norm, where the compiled native
path does not, so r=1.0 matches plain GPU vLLM within bf16 tolerance.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelAdapter, RopeSpec, UnsupportedModelError, check_rope_type

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM")

_ROPE_TYPES = {  # vLLM rotary class -> (rope_type, attribute holding _compute_inv_freq's arg)
    "RotaryEmbedding": ("default", "base"),
    "Llama3RotaryEmbedding": ("llama3", "base"),
    "YaRNScalingRotaryEmbedding": ("yarn", "scaling_factor"),
}


def rope_spec(rotary: Any) -> RopeSpec:
    """Pure per-pair frequencies of a vLLM rotary module, checked against its own cache."""
    name = type(rotary).__name__
    if name not in _ROPE_TYPES:
        raise UnsupportedModelError(
            f"vLLM rotary embedding {name} is not supported; supported: {sorted(_ROPE_TYPES)}")
    rope_type, arg = _ROPE_TYPES[name]
    check_rope_type(rope_type)
    inv_freq = rotary._compute_inv_freq(getattr(rotary, arg)).float()
    # The cache holds (cos, sin) * mscale; its angle at position 1 must be inv_freq.
    cache = rotary.cos_sin_cache[1].float()
    half = cache.numel() // 2
    angle = torch.atan2(cache[half:], cache[:half])
    if not torch.allclose(angle.cpu(), inv_freq.cpu(), atol=2e-2):
        raise UnsupportedModelError(f"{name}: frequencies do not match its cos/sin cache")
    return RopeSpec(inv_freq=inv_freq.cpu(), is_neox=bool(rotary.is_neox_style),
                    rope_type=rope_type)


class VllmLlamaAdapter(ModelAdapter):
    """`ModelAdapter` over a vLLM `*ForCausalLM` of the Llama family (one PP stage)."""

    def __init__(self, model: torch.nn.Module, identity: dict[str, Any] | None = None) -> None:
        arch = type(model).__name__
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch} is not supported by cacheblend's vLLM adapter; "
                f"supported: {list(ARCHITECTURES)}")
        self.model = model
        self.inner = model.model
        start = getattr(self.inner, "start_layer", 0)
        end = getattr(self.inner, "end_layer", len(self.inner.layers))
        if start != 0 or end != len(self.inner.layers):
            raise UnsupportedModelError("pipeline parallelism is not supported by cacheblend")
        self.layers = self.inner.layers
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_q_heads = int(attn.num_heads)
        self.num_kv_heads = int(attn.num_kv_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling)
        self.q_size, self.kv_size = int(attn.q_size), int(attn.kv_size)
        self.rope = rope_spec(attn.rotary_emb)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.hidden_size = int(self.inner.embed_tokens.embedding_dim
                               if hasattr(self.inner.embed_tokens, "embedding_dim")
                               else self.layers[0].input_layernorm.weight.shape[0])
        self._identity = identity or {}
        from vllm.distributed import get_tensor_model_parallel_world_size

        self.tp_size = int(get_tensor_model_parallel_world_size())
        self.fast = self.device.type == "cuda" and _cuda_ops_available(self.layers[0])

    # The packed residual stream: [hidden | residual]; layer 0's residual is unused.
    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h[:, : self.hidden_size], h[:, self.hidden_size:]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = (self.inner.embed_input_ids(input_ids) if hasattr(self.inner, "embed_input_ids")
               else self.inner.embed_tokens(input_ids))
        return torch.cat([emb, torch.zeros_like(emb)], dim=-1)

    def _input_norm(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed input, residual) exactly as vLLM's decoder layer computes them."""
        hidden, residual = self._split(h)
        norm = self.layers[layer].input_layernorm
        if layer == 0:
            return norm(hidden.contiguous()), hidden
        x, res = norm(hidden.clone(), residual.clone())  # the fused op may work in place
        return x, res

    @torch.inference_mode()
    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        if self.fast:
            return self._qkv_cuda(layer, h, positions)
        attn = self.layers[layer].self_attn
        x, _ = self._input_norm(layer, h)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n = x.shape[0]
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q = attn.q_norm(q.reshape(n, -1, self.head_dim)).reshape(n, -1)
            k = attn.k_norm(k.reshape(n, -1, self.head_dim)).reshape(n, -1)
        q, k = attn.rotary_emb(positions.long(), q.contiguous(), k.contiguous())
        return (q.reshape(n, self.num_q_heads, self.head_dim),
                k.reshape(n, self.num_kv_heads, self.head_dim),
                v.reshape(n, self.num_kv_heads, self.head_dim), h)

    def _qkv_cuda(self, layer: int, h: torch.Tensor, positions: torch.Tensor):
        """qkv with vLLM's fused CUDA ops; returns the residual sum `[N, hidden]` as h."""
        attn = self.layers[layer].self_attn
        norm = self.layers[layer].input_layernorm
        hidden, residual = self._split(h)
        res = hidden.contiguous() if layer == 0 else torch.add(hidden, residual)
        x = torch.empty_like(res)
        torch.ops._C.rms_norm(x, res, norm.weight, norm.variance_epsilon)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n = x.shape[0]
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q.reshape(n, -1, self.head_dim)).reshape(n, -1)
            k = attn.k_norm(k.reshape(n, -1, self.head_dim)).reshape(n, -1)
        q, k = attn.rotary_emb.forward_cuda(positions, q, k)  # in place, strided rows
        return (q.view(n, self.num_q_heads, self.head_dim),
                k.view(n, self.num_kv_heads, self.head_dim),
                v.view(n, self.num_kv_heads, self.head_dim), res)

    def _finish_cuda(self, layer: int, res: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        blk = self.layers[layer]
        o, _ = blk.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        post = blk.post_attention_layernorm
        res = res.contiguous()
        # In place: o becomes the normed MLP input, res the residual (the blender is done with it).
        torch.ops._C.fused_add_rms_norm(o, res, post.weight, post.variance_epsilon)
        mlp = blk.mlp
        gate_up, _ = mlp.gate_up_proj(o)
        act = torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype,
                          device=gate_up.device)
        torch.ops._C.silu_and_mul(act, gate_up)
        out, _ = mlp.down_proj(act)
        return torch.cat([out, res], dim=-1)

    @torch.inference_mode()
    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self._finish_cuda(layer, h, attn)
        blk = self.layers[layer]
        _, residual = self._input_norm(layer, h)
        o, _ = blk.self_attn.o_proj(attn.reshape(attn.shape[0], -1).contiguous())
        x, residual = blk.post_attention_layernorm(o, residual.clone())
        out = blk.mlp(x)
        return torch.cat([out, residual], dim=-1)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        hidden, residual = self._split(h)
        x, _ = self.inner.norm(hidden.clone(), residual.clone())
        return self.model.compute_logits(x)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def reduce_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Summed over the TP group with vLLM's own communicator (one collective per check
        layer, queued on the stream like the row-parallel layers' all-reduces: no host sync)."""
        if self.tp_size == 1:
            return scores
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(scores.float().contiguous())


def _cuda_ops_available(layer: torch.nn.Module) -> bool:
    """vLLM's fused CUDA ops are loaded and the layer has the shape they serve."""
    try:
        ops = torch.ops._C
        have = all(hasattr(ops, op) for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul"))
    except (AttributeError, RuntimeError):
        return False
    mlp = layer.mlp
    return (have and type(mlp.act_fn).__name__ == "SiluAndMul"
            and hasattr(mlp, "gate_up_proj") and hasattr(layer.self_attn.rotary_emb, "forward_cuda")
            and getattr(layer.input_layernorm, "variance_size_override", None) is None)


def vllm_adapter_for(model: torch.nn.Module, identity: dict[str, Any] | None = None
                     ) -> ModelAdapter:
    """The vLLM adapter for a loaded model; refuses unknown families with the supported list."""
    return VllmLlamaAdapter(model, identity)
