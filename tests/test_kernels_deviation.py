"""Deviation kernel vs reference, and the sync-free HKVD top-k vs the original."""

from __future__ import annotations

import pytest
import torch

from blend.triton_kernels._testing import paged_cache, slots_of, sorted_positions
from blend.triton_kernels.deviation import (
    METRICS,
    _hkvd_select_torch,
    hkvd_select,
    hkvd_select_ref,
    token_deviation,
    token_deviation_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(h, dim, dtype, lens, nsel, block_size, metric, heads_first=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kc, vc, table = paged_cache(lens, block_size, h, dim, dtype, DEV, heads_first, gen=gen)
    slots = torch.cat([slots_of(table, block_size, b, sorted_positions(n, s, gen))
                       for b, (n, s) in enumerate(zip(lens, nsel))])
    n = slots.numel()
    # Fresh K/V as strided views of one fused buffer, as a qkv projection produces them.
    kv = torch.randn(n, 2, h, dim, generator=gen).to(dtype).to(DEV)
    k_new, v_new = kv[:, 0], kv[:, 1]
    ref = token_deviation_ref(k_new, v_new, kc, vc, slots, metric)
    got = token_deviation(k_new, v_new, kc, vc, slots, metric)
    assert got.shape == (n,) and got.dtype == torch.float32
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("metric", METRICS)
def test_metrics(metric):
    run_case(3, 64, torch.bfloat16, lens=[37, 21], nsel=[37, 9], block_size=16, metric=metric)


@pytest.mark.parametrize("dim", [64, 128])
def test_strided_cache_and_sizes(dim):
    run_case(2, dim, torch.float16, lens=[13], nsel=[11], block_size=8, metric="kv_l2",
             heads_first=True, seed=dim)


def test_empty():
    run_case(2, 64, torch.float32, lens=[10], nsel=[0], block_size=8, metric="v_l2")
    with pytest.raises(ValueError):
        token_deviation(*[torch.zeros(1, 1, 1, 4)] * 4, torch.zeros(1, dtype=torch.long), "l3")


def _select_case(lens, takes, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    dev = torch.randn(total, generator=gen).abs()
    if ties:
        dev = (dev * 3).round()  # many equal values: lower index must win
        dev[::7] = float("nan")
        dev[3::11] = float("inf")
        dev[5::13] = float("-inf")
    forced = torch.rand(total, generator=gen) < 0.1
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    dev, forced = dev.to(DEV), forced.to(DEV)
    ref = hkvd_select_ref(dev, forced, cu, takes)
    got = hkvd_select(dev, forced, cu, takes)
    assert torch.equal(got.cpu(), ref.cpu())
    assert torch.equal(_hkvd_select_torch(dev, forced, cu, takes).cpu(), ref.cpu())
    return got


def test_forced_rank_above_infinite_deviation():
    """An overflowed (+inf) deviation must not push a forced token (question, text) out."""
    dev = torch.rand(20)
    dev[:5] = float("inf")
    forced = torch.zeros(20, dtype=torch.bool)
    forced[10:15] = True
    want = [0, 1, 10, 11, 12, 13, 14]  # all forced, then the first two +inf by index
    for select in (hkvd_select, _hkvd_select_torch, hkvd_select_ref):
        got = select(dev.to(DEV), forced.to(DEV), [0, 20], [7])
        assert got.cpu().tolist() == want, select.__name__


def test_hkvd_select_matches_original():
    _select_case([17, 0, 30, 5], [4, 0, 9, 9], seed=0)  # k >= n clamps
    _select_case([40, 33], [12, 0], seed=1, ties=True)
    assert _select_case([0, 0], [3, 1], seed=2).numel() == 0
    assert _select_case([], [], seed=3).numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_realistic(metric):
    run_case(8, 128, torch.bfloat16, lens=[8256, 3001], nsel=[8256, 2999], block_size=16,
             metric=metric, seed=7)
    _select_case([8192, 5000, 3], [1229, 750, 5], seed=8, ties=True)


@pytest.mark.gpu
def test_gpu_hkvd_select_has_no_sync():
    dev = torch.rand(32768, device="cuda")
    forced = torch.zeros(32768, dtype=torch.bool, device="cuda")
    hkvd_select(dev, forced, [0, 16384, 32768], [2458, 2458])  # warm
    torch.cuda.set_sync_debug_mode("error")
    try:
        hkvd_select(dev, forced, [0, 16384, 32768], [2458, 2458])
        token_deviation(*[torch.randn(64, 8, 128, device="cuda")] * 2,
                        *[torch.randn(4, 16, 8, 128, device="cuda")] * 2,
                        torch.arange(64, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
