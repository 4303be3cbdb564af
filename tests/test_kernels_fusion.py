"""KV fusion (scatter) kernel vs reference; target slots poisoned first."""

from __future__ import annotations

import pytest
import torch

from blend.triton_kernels._testing import paged_cache, slots_of, sorted_positions
from blend.triton_kernels.kv_fusion import fuse_kv, fuse_kv_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(h, dim, dtype, new_dtype, lens, nsel, block_size, heads_first=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kc, vc, table = paged_cache(lens, block_size, h, dim, dtype, DEV, heads_first, gen=gen)
    slots = torch.cat([slots_of(table, block_size, b, sorted_positions(n, s, gen))
                       for b, (n, s) in enumerate(zip(lens, nsel))])
    blk, off = slots // block_size, slots % block_size
    kc[blk, off] = float("nan")  # a slot the kernel misses stays NaN
    vc[blk, off] = float("nan")
    kv = torch.randn(slots.numel(), 2, h, dim, generator=gen).to(new_dtype).to(DEV)
    k_ref, v_ref = kc.clone(), vc.clone()
    fuse_kv_ref(k_ref, v_ref, slots, kv[:, 0], kv[:, 1])
    fuse_kv(kc, vc, slots, kv[:, 0], kv[:, 1])
    assert not kc[blk, off].isnan().any() and not vc[blk, off].isnan().any()
    torch.testing.assert_close(kc, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, v_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads_first", [False, True])
def test_scatter(dim, heads_first):
    run_case(3, dim, torch.bfloat16, torch.bfloat16, lens=[25, 40], nsel=[7, 13],
             block_size=16, heads_first=heads_first, seed=dim)


def test_cast_and_empty():
    run_case(2, 64, torch.float16, torch.float32, lens=[19], nsel=[19], block_size=4)
    run_case(2, 64, torch.float16, torch.float16, lens=[19], nsel=[0], block_size=4)


@pytest.mark.parametrize("fuse", [fuse_kv, fuse_kv_ref])
def test_negative_slots_write_nowhere(fuse):
    """Padding rows (the CUDA-graph buckets) carry slot -1: the cache keeps its values, and
    the real rows around them land where they belong."""
    gen = torch.Generator().manual_seed(3)
    kc, vc, table = paged_cache([37], 8, 2, 64, torch.bfloat16, DEV, False, gen=gen)
    slots = slots_of(table, 8, 0, torch.tensor([0, 5, 9, 36]))
    padded = torch.cat([slots[:2], torch.full((3,), -1, device=slots.device), slots[2:],
                        torch.full((2,), -1, device=slots.device)])
    kv = torch.randn(padded.numel(), 2, 2, 64, generator=gen).to(torch.bfloat16).to(DEV)
    k_ref, v_ref = kc.clone(), vc.clone()
    real = padded >= 0
    fuse_kv_ref(k_ref, v_ref, slots, kv[real, 0], kv[real, 1])
    fuse(kc, vc, padded, kv[:, 0], kv[:, 1])
    torch.testing.assert_close(kc, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(vc, v_ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("heads_first", [False, True])
def test_gpu_realistic(heads_first):
    run_case(8, 128, torch.bfloat16, torch.bfloat16, lens=[32768, 8256], nsel=[4915, 1238],
             block_size=16, heads_first=heads_first, seed=9)
