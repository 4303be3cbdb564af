"""The connector's refusals of set-ups that would blend wrongly (engine-free)."""

from types import SimpleNamespace

import pytest

from blend.connector.guards import check_block_size, check_kv_dtype, check_load_before_forward


@pytest.mark.parametrize("dtype", [None, "auto"])
def test_model_dtype_kv_is_accepted(dtype):
    check_kv_dtype(dtype)


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_quantized_kv_is_refused_naming_the_key(dtype):
    with pytest.raises(RuntimeError, match=f"kv_cache_dtype '{dtype}'.*use 'auto'"):
        check_kv_dtype(dtype)


def test_kernel_blocks_smaller_than_the_schedulers_are_refused():
    check_block_size(16, 16, "FLASH_ATTN")
    with pytest.raises(RuntimeError, match="blocks of 64 tokens.*block_size is 128.*--block-size 64"):
        check_block_size(64, 128, "FLASHINFER")


def test_a_blend_started_after_the_forward_is_refused():
    after = SimpleNamespace(has_sync_kv_loads=False)
    with pytest.raises(RuntimeError, match="after the forward"):
        check_load_before_forward(True, after)


@pytest.mark.parametrize("has_loads, output", [
    (True, SimpleNamespace(has_sync_kv_loads=True)),  # vLLM 0.33: loads before the forward
    (False, SimpleNamespace(has_sync_kv_loads=False)),  # nothing to blend: nothing to order
    (True, None),  # runners that pass no scheduler output (vLLM 0.32's CPU mixin)
    (True, SimpleNamespace()),  # a SchedulerOutput without the flag (vLLM 0.26)
])
def test_the_orders_vllm_uses_pass(has_loads, output):
    check_load_before_forward(has_loads, output)
