"""The vLLM APIs cacheblend relies on beyond its patch points, as data for `check_wheel`.

The imports from vLLM and the connector's overrides are read from our own source (so a new
import or override is checked without editing this file); what cannot be read that way (the
attributes we read off vLLM objects, the backends' KV views, the load order) is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.base"
BASE_CLASS = "KVConnectorBase_V1"
CONNECTOR_FILE = "blend/connector/__init__.py"  # where BlendConnector is defined
CONNECTOR_CLASS = "BlendConnector"
# Our source trees whose `vllm` imports are checked (repo-relative).
SOURCE_DIRS = ("blend", "patches")

# Overrides whose absence in the base class is harmless: vLLM then never calls them.
# `requires_kv_delivery` is new in 0.33; before it, a preempted request's stale output was
# always delivered, which is what our False asks for.
OPTIONAL_OVERRIDES = frozenset({"requires_kv_delivery"})
# Members of the base class we call or read on `self`.
BASE_MEMBERS = ("_get_connector_metadata", "_kv_transfer_config")


@dataclass(frozen=True)
class Member:
    """`module.cls` must have `member` (a def, a field, or a `self.member =` in a method)."""

    why: str
    module: str
    cls: str
    member: str
    optional: bool = False


def _members(why: str, module: str, cls: str, names: str, optional: bool = False) -> list[Member]:
    return [Member(why, module, cls, n, optional) for n in names.split()]


_SCHED_OUT = "vllm.v1.core.sched.output"
_LLAMA = "vllm.model_executor.models.llama"
MEMBERS: tuple[Member, ...] = (
    *_members("scheduler metadata", _SCHED_OUT, "SchedulerOutput",
              "scheduled_new_reqs scheduled_cached_reqs num_scheduled_tokens"),
    *_members("scheduler metadata", _SCHED_OUT, "NewRequestData",
              "req_id block_ids num_computed_tokens"),
    *_members("scheduler metadata", _SCHED_OUT, "CachedRequestData",
              "req_ids resumed_req_ids new_block_ids num_computed_tokens"),
    *_members("request", "vllm.v1.request", "Request",
              "request_id prompt_token_ids kv_transfer_params"),
    *_members("registration", "vllm.distributed.kv_transfer.kv_connector.factory",
              "KVConnectorFactory", "register_connector _registry"),
    *_members("config", "vllm.config.cache", "CacheConfig", "block_size cache_dtype"),
    *_members("config", "vllm.config.model", "ModelConfig",
              "hf_text_config max_model_len architectures tokenizer tokenizer_revision "
              "trust_remote_code"),
    *_members("config", "vllm.config.compilation", "CompilationConfig", "static_forward_context"),
    *_members("backend name", "vllm.model_executor.layers.attention.attention", "Attention",
              "get_attn_backend"),
    *_members("model adapter", _LLAMA, "LlamaModel", "embed_tokens layers norm"),
    *_members("model adapter", _LLAMA, "LlamaDecoderLayer",
              "self_attn input_layernorm post_attention_layernorm mlp"),
    *_members("model adapter", _LLAMA, "LlamaAttention",
              "qkv_proj rotary_emb o_proj q_size kv_size num_heads num_kv_heads head_dim scaling"),
    *_members("model adapter", _LLAMA, "LlamaMLP", "gate_up_proj act_fn down_proj"),
    *_members("model adapter", _LLAMA, "LlamaForCausalLM", "compute_logits"),
    *_members("model adapter", "vllm.model_executor.layers.rotary_embedding.base",
              "RotaryEmbedding", "cos_sin_cache is_neox_style forward_cuda"),
    *_members("model adapter", "vllm.model_executor.layers.layernorm", "RMSNorm",
              "weight variance_epsilon"),
)

# Module-level names we use through a module object (`ops.x`, `envs.X`).
MODULE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("CPU attention", "vllm._custom_ops", "cpu_attn_reshape_and_cache"),
    ("CPU attention", "vllm._custom_ops", "cpu_attention_with_kv_cache"),
    ("CPU attention", "vllm._custom_ops", "cpu_attn_get_scheduler_metadata"),
    ("CPU attention", "vllm.envs", "VLLM_CPU_ATTN_SPLIT_KV"),
)

# Attention backend name -> (module, the source line that cuts its per-layer KV into K and V
# the way `blend/connector/kv_layout.py:layer_views` assumes).
KV_VIEWS: dict[str, tuple[str, str]] = {
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn", "kv_cache.transpose(1, 2).split("),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn", "kv_cache.transpose(1, 2).split("),
    "FLASHINFER": ("vllm.v1.attention.backends.flashinfer", "kv_cache.transpose(1, 2).split("),
    "FLEX_ATTENTION": ("vllm.v1.attention.backends.flex_attention",
                       "kv_cache.transpose(1, 2).split("),
    "CPU_ATTN": ("vllm.v1.attention.backends.cpu_attn", "kv_cache.chunk(2, dim=2)"),
}

# Where the runners call the connector's `start_load_kv` (the blend must run before the forward).
LOAD_CALLERS = ("vllm.v1.worker.kv_connector_model_runner_mixin", "vllm.v1.worker.gpu.kv_connector")
SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
