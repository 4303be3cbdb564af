"""`BlendConnector`: CacheBlend as a vLLM v1 KV connector.

Enable it with `blend.kv_transfer_config(...)`, or raw:

    KVTransferConfig(kv_connector="BlendConnector", kv_connector_module_path="blend.connector",
                     kv_role="kv_both", kv_connector_extra_config={...})

Scheduler role (engine-core process): `scheduler.BlendScheduler`
decides which tokens each request gets from the connector. Worker role
(each worker): `worker.BlendWorker` blends them into vLLM's paged
cache in `start_load_kv`, before the step's forward; vLLM then prefills the
question. Loads are synchronous, so `wait_for_layer_load` has nothing to
wait for. Saving is per chunk, not per layer: `wait_for_save` extracts the
chunks the scheduler names (computed by vLLM or by the blend inside a prompt)
once the step's forward is queued, and a thread writes them to the store
(`connector/saver.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from blend.config import BlendConfig
from blend.connector.extra_config import check_extra_config
from blend.connector.guards import check_load_before_forward
from blend.connector.metadata import BlendConnectorMetadata
from blend.log import get_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = get_logger("Connector")


def _check_vllm() -> None:
    from blend.patches import vllm_version
    from blend.patches.table import points_for, unsupported_message

    v = vllm_version()
    if v is None or points_for(v) is None:
        raise RuntimeError(unsupported_message(str(v)))


def _check_architecture(vllm_config: VllmConfig) -> None:
    from blend.models.base import UnsupportedModelError
    from blend.models.vllm_llama import ARCHITECTURES

    archs = list(getattr(vllm_config.model_config, "architectures", None) or [])
    if not any(a in ARCHITECTURES for a in archs):
        raise UnsupportedModelError(
            f"cacheblend: model architecture {archs} is not supported; supported: "
            f"{list(ARCHITECTURES)}")


class BlendConnector(KVConnectorBase_V1):
    """CacheBlend: reuse chunk KV at any position, recompute the high-deviation tokens."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _check_vllm()
        _check_architecture(vllm_config)
        extra = check_extra_config(dict(self._kv_transfer_config.kv_connector_extra_config or {}))
        self.config = BlendConfig.from_dict(extra.get("cache_fuse_metadata"))
        self.config.check_model(vllm_config.model_config.hf_text_config.num_hidden_layers)
        self._extra = extra
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from blend.connector.identity import vllm_fingerprint
            from blend.connector.scheduler import BlendScheduler
            from blend.store import open_store
            from blend.store.admission import make_admission

            fp = vllm_fingerprint(vllm_config, 0)
            self._scheduler = BlendScheduler(extra, fp, open_store(extra.get("store"), fp),
                                             tokenizer_loader=lambda: _tokenizer(vllm_config),
                                             admission=make_admission(extra["admit"]),
                                             index_dir=_index_dir(extra.get("store")))
            log.info("scheduler ready: store %s, on_miss=%s, %s", extra.get("store"),
                     extra["on_miss"], self.config.to_dict())
        else:
            from blend.connector.worker import BlendWorker

            self._worker = BlendWorker(vllm_config, extra, self.config)

    # ============================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, BlendConnectorMetadata)
        check_load_before_forward(bool(meta.requests), kwargs.get("scheduler_output"))
        self._worker.start_load_kv(meta.requests)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # the blend completes inside start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # whole chunks are saved after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            meta = self._get_connector_metadata()
            assert isinstance(meta, BlendConnectorMetadata)
            self._worker.wait_for_save(meta.saves)

    # ========================================================= scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        return False, self._scheduler.request_finished(request)

    def shutdown(self) -> None:
        """Let the saver finish what is queued (bounded), so stored chunks outlive the engine;
        then log what the store did, so an unexpected miss rate can be traced to evictions,
        put failures or errors after the fact."""
        if self._worker is not None and self._worker.saver is not None:
            self._worker.saver.flush(timeout=30.0)
            self._worker.saver.close()
        from blend.connector.stats import store_reports

        for role, report in store_reports(self._scheduler, self._worker).items():
            log.info("%s store at shutdown: %s", role, report)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a lost save is only a future miss

    # ================================================================ stats
    def get_kv_connector_stats(self) -> Any:
        from blend.connector.stats import collect

        return collect(self._scheduler, self._worker)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        from blend.connector.stats import BlendStats

        return BlendStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        from blend.connector.stats import BlendPromMetrics

        return BlendPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _index_dir(store: Any) -> Any:
    """Where chunks' token ids live for content matching: beside the store's files."""
    from blend.store.spec import parse

    path = parse(store)["path"]
    return (path[0] if isinstance(path, list) else path) / "index"


def _tokenizer(vllm_config: VllmConfig) -> Any:
    """The model's tokenizer, for separator mode in the scheduler process."""
    from transformers import AutoTokenizer

    mc = vllm_config.model_config
    return AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                         trust_remote_code=mc.trust_remote_code)
