"""`connector/kv_layout.py`: K/V views over vLLM's per-layer cache tensors read and write
exactly where vLLM's own code does, and layouts that are not strided views are refused."""

from __future__ import annotations

import pytest
import torch

from blend.connector.kv_layout import (
    GPU_BACKENDS,
    InBlockStrides,
    UnsupportedLayoutError,
    _fit,
    layer_views,
    probe_cpu_layout,
)

B, H, N, D = 3, 2, 32, 64  # blocks, KV heads, block size, head dim


def numbered(*shape: int) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_views_are_the_backends_transpose_and_split(backend):
    kv = numbered(B, H, N, 2 * D)
    k, v = layer_views(kv, backend)
    assert k.shape == v.shape == (B, N, H, D)
    assert torch.equal(k[1, 5, 1], kv[1, 1, 5, :D]) and torch.equal(v[2, 7, 0], kv[2, 0, 7, D:])
    k[0, 3, 1, 2] = -1.0  # views, not copies: the blend writes vLLM's cache through them
    assert kv[0, 1, 3, 2] == -1.0


def _isa() -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, N, D)


def test_cpu_views_read_what_vllms_cache_write_op_wrote():
    from vllm import _custom_ops as ops

    isa = _isa()
    layout = probe_cpu_layout(isa, H, N, D, torch.float32)
    kv = torch.zeros(B, H, N, 2 * D)
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(5, H, D, generator=g), torch.randn(5, H, D, generator=g)
    slots = torch.tensor([N + 0, N + 1, 2 * N + 4, 2 * N + 31, 7])  # blocks 1, 1, 2, 2, 0
    k_cache, v_cache = kv.view(B, H, 2 * N, D).chunk(2, dim=2)  # as the CPU backend does
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, isa)
    k, v = layer_views(kv, "CPU_ATTN", layout)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(k[s // N, s % N], key[i]), (isa, s)
        assert torch.equal(v[s // N, s % N], value[i]), (isa, s)
    untouched = torch.ones(B, N, dtype=torch.bool)
    untouched[slots // N, slots % N] = False
    assert k[untouched].abs().sum() == 0 and v[untouched].abs().sum() == 0


def test_cpu_attn_needs_a_probed_layout():
    with pytest.raises(UnsupportedLayoutError, match="probed layout"):
        layer_views(torch.zeros(B, H, N, 2 * D), "CPU_ATTN")


@pytest.mark.parametrize("backend,shape,needle", [
    ("XFORMERS", (B, H, N, 2 * D), "not supported by cacheblend"),
    ("FLASH_ATTN", (B, N, 2 * D), "4-D"),
])
def test_unknown_backends_and_shapes_are_refused_by_name(backend, shape, needle):
    with pytest.raises(UnsupportedLayoutError, match=needle) as e:
        layer_views(torch.zeros(shape), backend)
    if needle.startswith("not"):
        assert all(b in str(e.value) for b in GPU_BACKENDS)  # says what would work


def test_fit_finds_strides_and_rejects_a_packed_layout():
    n, h, d = (t.reshape(-1) for t in torch.meshgrid(
        torch.arange(4), torch.arange(2), torch.arange(8), indexing="ij"))
    pos = 100 + n * 3 + h * 40 + d * 12  # strides: token 3, head 40, dim 12
    assert _fit(pos, n, h, d) == InBlockStrides(3, 40, 12, 100)
    shuffled = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))]
    assert _fit(shuffled, n, h, d) is None  # positions that no strides explain: not a view
