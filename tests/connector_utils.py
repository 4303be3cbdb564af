"""Build `BlendConnector`'s scheduler side without an engine.

The same approach as vLLM's own connector unit tests (`tests/v1/kv_connector/unit/utils.py`
in vLLM: `create_vllm_config`, `create_scheduler`, `create_request`): a `VllmConfig`
from a model's `config.json` alone (no weights, no tokenizer, no worker), requests built
the way the engine builds them, and either hand-made `SchedulerOutput`s or vLLM's real
`Scheduler` driving the connector. Nothing here starts an engine process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

import blend
from blend.connector import BlendConnector
from blend.keys import chunk_key, token_array
from blend.segments import Span, make_params

BLOCK_SIZE = 16
EOS = 2
# A Llama small enough that building its config costs milliseconds; the connector reads
# only the shape (fingerprint, layer count), never weights.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000,
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": EOS,
}


def tiny_model_dir(root: Path) -> Path:
    """A model directory holding only `config.json` (what the scheduler process reads)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_LLAMA))
    return root


def create_vllm_config(model_dir: Path, store_dir: Path, *, max_num_batched_tokens: int = 2048,
                       enable_prefix_caching: bool = True, **extra: Any) -> VllmConfig:
    """vLLM's config with the blend connector on; `extra` goes to `kv_transfer_config`.

    Test defaults differ from the product's where the product's would hide the claim
    logic: every missed chunk is admitted (`admit="always"`), any hit is enough to blend
    (`min_hit_ratio=0`), and unmarked prompts are plain (`unmarked="none"`, no tokenizer).
    """
    extra = {"admit": "always", "min_hit_ratio": 0.0, "unmarked": "none", **extra}
    model = ModelConfig(model=str(model_dir), dtype="float32", seed=0, max_model_len=4096,
                        skip_tokenizer_init=True)
    return VllmConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=BLOCK_SIZE,
                                 enable_prefix_caching=enable_prefix_caching),
        scheduler_config=SchedulerConfig(max_num_seqs=16,
                                         max_num_batched_tokens=max_num_batched_tokens,
                                         max_model_len=4096, is_encoder_decoder=False),
        kv_transfer_config=blend.kv_transfer_config(store=f"local:{store_dir}", **extra),
        device_config=DeviceConfig("cpu"),
    )


def create_connector(vllm_config: VllmConfig) -> BlendConnector:
    """The facade in the scheduler role, as vLLM's engine core builds it."""
    return BlendConnector(vllm_config, KVConnectorRole.SCHEDULER)


def create_scheduler(vllm_config: VllmConfig, num_blocks: int = 1000) -> Scheduler:
    """vLLM's own scheduler over a fake KV cache; it builds the connector itself."""
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                     structured_output_manager=StructuredOutputManager(vllm_config),
                     block_size=BLOCK_SIZE, log_stats=True)


_ids = count(1)
_hash_ready = False


def create_request(prompt_token_ids: Sequence[int], spans: Sequence[Span] | None = None, *,
                   on_miss: str | None = None, cache_fuse_metadata: dict | None = None,
                   kv_transfer_params: dict | None = None, max_tokens: int = 4,
                   request_id: str | None = None) -> Request:
    """A request as the engine core receives it: chunk spans and per-request overrides ride
    in `SamplingParams.extra_args["kv_transfer_params"]`, the one channel that reaches the
    connector (`blend.api.BlendPrompt.attach`). `kv_transfer_params` replaces them raw."""
    global _hash_ready
    if not _hash_ready:
        init_none_hash(sha256)
        _hash_ready = True
    if kv_transfer_params is None and spans is not None:
        kv_transfer_params = make_params(spans, on_miss, cache_fuse_metadata)
    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else None
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra)
    sp.update_from_generation_config({}, EOS)
    return Request(request_id=request_id or f"req-{next(_ids)}",
                   prompt_token_ids=list(prompt_token_ids), sampling_params=sp,
                   pooling_params=None,
                   block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256))


def tokens(n: int, seed: int) -> list[int]:
    """`n` distinct-looking token ids (3..999), different for each seed."""
    return [3 + (seed * 7919 + i * 104729) % 997 for i in range(n)]


def store_chunk(connector: BlendConnector, prompt: Sequence[int], span: Span) -> str:
    """Put a (fake) chunk KV under the key the scheduler will look up; return the key."""
    sched = connector._scheduler
    s, e = span
    key = chunk_key(sched.fingerprint, token_array(list(prompt))[s:e])
    assert sched.store.put(key, torch.zeros(TINY_LLAMA["num_hidden_layers"], 2, e - s, 2, 16))
    return key


def no_blocks() -> KVCacheBlocks:
    """What `update_state_after_alloc` receives; the connector does not read it."""
    return KVCacheBlocks(blocks=([],))


def new_req_output(request: Request, block_ids: list[int], num_computed: int,
                   num_scheduled: int) -> SchedulerOutput:
    """A step that schedules `request` for the first time."""
    out = SchedulerOutput.make_empty()
    out.scheduled_new_reqs = [NewRequestData.from_request(request, (list(block_ids),))]
    out.scheduled_new_reqs[0].num_computed_tokens = num_computed
    out.num_scheduled_tokens = {request.request_id: num_scheduled}
    out.total_num_scheduled_tokens = num_scheduled
    return out


def cached_req_output(rid: str, num_computed: int, num_scheduled: int,
                      new_block_ids: list[int] | None = None,
                      resumed: bool = False) -> SchedulerOutput:
    """A step that schedules an already running (or, `resumed`, a preempted) request."""
    out = SchedulerOutput.make_empty()
    out.scheduled_cached_reqs = CachedRequestData(
        req_ids=[rid], resumed_req_ids={rid} if resumed else set(), new_token_ids=[[]],
        all_token_ids={}, new_block_ids=[None if new_block_ids is None else (new_block_ids,)],
        num_computed_tokens=[num_computed], num_output_tokens=[0])
    out.num_scheduled_tokens = {rid: num_scheduled}
    out.total_num_scheduled_tokens = num_scheduled
    return out


def model_runner_output(requests: Sequence[Request], token_id: int = EOS) -> ModelRunnerOutput:
    """One sampled token per request (EOS by default: the requests finish)."""
    ids = [r.request_id for r in requests]
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[token_id] for _ in ids])
