"""Selected-token attention: Triton kernel vs the SDPA reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from blend.triton_kernels._testing import paged_cache, sorted_positions
from blend.triton_kernels.attention import selected_attention, selected_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_case(hq, hkv, dim, dtype, lens, nsel, block_size, seed=0, heads_first=False):
    """A paged cache, sorted random query positions (`nsel[b] == lens[b]`: all of them),
    queries, and the reference output."""
    gen = torch.Generator().manual_seed(seed)
    kc, vc, table = paged_cache(lens, block_size, hkv, dim, dtype, DEV, heads_first, gen=gen)
    pos = [sorted_positions(n, s, gen) for n, s in zip(lens, nsel)]
    cu = [0]
    for s in nsel:
        cu.append(cu[-1] + s)
    q_pos = torch.cat(pos).to(torch.int32).to(DEV)
    q = torch.randn(cu[-1], hq, dim, generator=gen).to(dtype).to(DEV)
    scale = dim ** -0.5
    ref = selected_attention_ref(q, kc, vc, q_pos, cu, table, lens, scale)
    return kc, vc, table, q, q_pos, cu, scale, ref


def run_case(hq, hkv, dim, dtype, lens, nsel, block_size, heads_first=False, seed=0,
             device_lens=False, num_splits=None, config=None):
    kc, vc, table, q, q_pos, cu, scale, ref = make_case(hq, hkv, dim, dtype, lens, nsel,
                                                        block_size, seed, heads_first)
    out = torch.full_like(q, float("nan"))
    cu_arg = torch.tensor(cu, device=DEV, dtype=torch.int32) if device_lens else cu
    lens_arg = torch.tensor(lens, device=DEV, dtype=torch.int32) if device_lens else lens
    got = selected_attention(q, kc, vc, q_pos, cu_arg, table, lens_arg, scale, out=out,
                             num_splits=num_splits, config=config)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "unwritten output rows"
    if q.shape[0]:
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < TOL[dtype], err


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (7, 1)])  # GQA 1, 3, 7
@pytest.mark.parametrize("dim", [64, 128])
def test_gqa_and_head_dim(hq, hkv, dim):
    dtype = torch.bfloat16 if dim == 64 else torch.float16
    run_case(hq, hkv, dim, dtype, lens=[45, 23], nsel=[9, 7], block_size=16, seed=hq + dim)


def test_strided_heads_first_cache_fp32():
    run_case(6, 2, 64, torch.float32, lens=[37, 50], nsel=[5, 11], block_size=8,
             heads_first=True, seed=1)


def test_empty_requests_and_empty_batch():
    run_case(4, 2, 64, torch.float16, lens=[30, 5, 41, 19], nsel=[0, 5, 0, 6], block_size=16,
             seed=2, device_lens=True)
    run_case(4, 2, 64, torch.float16, lens=[30], nsel=[0], block_size=16, seed=3)


def test_contiguous_cache_and_all_positions():
    # num_blocks == 1 (one block holds the request): the ONE_BLOCK path; every position selected.
    run_case(3, 1, 64, torch.float32, lens=[53], nsel=[53], block_size=53, seed=4)


def test_several_pages_per_key_tile():
    # Eight 4-token pages in every 32-key tile.
    cfg = (32, 32, 4, 1) if DEV == "cuda" else (16, 32, 1, 1)
    run_case(6, 2, 64, torch.float16, lens=[75, 33], nsel=[20, 9], block_size=4, seed=12,
             config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                                 (128, 128, 8, 3), (64, 64, 4, 3)])
def test_gpu_benchmark_configs(cfg):
    # Every tile shape the benchmark sweeps must be right too (a pipelining race shows here).
    run_case(32, 8, 128, torch.bfloat16, lens=[3001], nsel=[600], block_size=16, seed=13,
             config=cfg)
    run_case(32, 8, 128, torch.bfloat16, lens=[3001], nsel=[600], block_size=3001, seed=14,
             config=cfg)


@pytest.mark.parametrize("splits", [2, 5])
def test_split_kv(splits):
    # Keys cut into ranges merged by the combine kernel (short questions over long contexts);
    # some splits are empty for the short request.
    run_case(6, 2, 64, torch.float16, lens=[70, 9], nsel=[6, 3], block_size=16, seed=splits,
             num_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 3, 16])
def test_gpu_question_over_long_context(splits):
    # 64 contiguous query positions at the end of 32k keys: the auto split path.
    gen = torch.Generator().manual_seed(11)
    ctx = 32768
    kc, vc, table = paged_cache([ctx + 64], 16, 8, 128, torch.bfloat16, DEV, gen=gen)
    q = torch.randn(64, 32, 128, generator=gen).to(torch.bfloat16).to(DEV)
    q_pos = torch.arange(ctx, ctx + 64, dtype=torch.int32, device=DEV)
    ref = selected_attention_ref(q, kc, vc, q_pos, [0, 64], table, [ctx + 64], 128**-0.5)
    got = selected_attention(q, kc, vc, q_pos, [0, 64], table, [ctx + 64], 128**-0.5,
                             num_splits=splits)
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1.5e-2, err


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,dim", [(32, 8, 128), (28, 4, 128), (21, 3, 64), (14, 14, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic(hq, hkv, dim, dtype):
    run_case(hq, hkv, dim, dtype, lens=[4099, 1000, 2500], nsel=[615, 150, 377],
             block_size=16, seed=hq)


@pytest.mark.gpu
def test_gpu_contiguous_8k_heads_first():
    run_case(32, 8, 128, torch.bfloat16, lens=[8256], nsel=[1238], block_size=8256, seed=5)
    run_case(32, 8, 128, torch.bfloat16, lens=[3000, 2001], nsel=[450, 300], block_size=16,
             heads_first=True, seed=6)


# --------------------------------------------------------------------------- prefix + band
# The flash backend: FA3 attends each tile's keys up to its first query position, the kernel
# only the masked band after them, merging the two softmax states. On the CPU the prefix
# reference stands in for FA3; on the GPU FA3 itself runs where vLLM ships it.


def run_prefix_case(hq, hkv, dim, dtype, lens, nsel, block_size, seed=0):
    from blend.triton_kernels.attention import prefix_attention_ref, tile_tokens

    kc, vc, table, q, q_pos, cu, scale, ref = make_case(hq, hkv, dim, dtype, lens, nsel,
                                                        block_size, seed)
    o, lse = prefix_attention_ref(q, kc, vc, q_pos, cu, table, scale, tile_tokens(hq, hkv, dim))
    got = selected_attention(q, kc, vc, q_pos, cu, table, lens, scale, out=o, prefix=(o, lse))
    assert not got.isnan().any()
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("hq,hkv,dim", [(6, 2, 64), (7, 1, 64), (4, 4, 128)])
def test_prefix_band_merge(hq, hkv, dim):
    # Odd sizes, a request with one query, one with a query at position 0 (empty prefix tail).
    run_prefix_case(hq, hkv, dim, torch.float32, lens=[61, 1, 37], nsel=[23, 1, 9],
                    block_size=16, seed=hq + dim)


def test_prefix_band_merge_dense_bf16():
    # Every position selected: each tile's band is its own diagonal block.
    run_prefix_case(6, 2, 64, torch.bfloat16, lens=[45, 18], nsel=[45, 18], block_size=8, seed=3)


def _flash():
    from blend.triton_kernels.flash import flash_varlen

    if flash_varlen() is None:
        pytest.skip("vLLM's FA3 is not available here")


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,dim", [(32, 8, 128), (28, 4, 128), (9, 3, 64), (14, 2, 64)])
def test_gpu_flash_selected(hq, hkv, dim):
    from blend.triton_kernels.flash import flash_selected_attention

    _flash()
    lens, nsel = [4099, 1, 2500, 777], [615, 1, 377, 777]  # the last: every position
    kc, vc, table, q, q_pos, cu, scale, ref = make_case(hq, hkv, dim, torch.bfloat16, lens,
                                                        nsel, 16, seed=hq)
    for _ in range(2):  # the second call reuses the phase's tile metadata
        got = flash_selected_attention(q, kc, vc, q_pos, cu, table, lens, scale)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < TOL[torch.bfloat16], err


@pytest.mark.gpu
def test_gpu_flash_dense_tail_and_whole():
    # Dense: each request's queries are its last positions (all of them, or only the tail).
    from blend.triton_kernels.flash import flash_dense_attention

    _flash()
    gen = torch.Generator().manual_seed(7)
    lens, nq = [3001, 64, 530], [3001, 64, 17]
    kc, vc, table = paged_cache(lens, 16, 8, 128, torch.bfloat16, DEV, gen=gen)
    q_pos = torch.cat([torch.arange(n - k, n) for n, k in zip(lens, nq)]).to(torch.int32).to(DEV)
    cu = [0]
    for k in nq:
        cu.append(cu[-1] + k)
    q = torch.randn(cu[-1], 32, 128, generator=gen).to(torch.bfloat16).to(DEV)
    ref = selected_attention_ref(q, kc, vc, q_pos, cu, table, lens, 128 ** -0.5)
    got = flash_dense_attention(q, kc, vc, q_pos, cu, table, lens, 128 ** -0.5)
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[torch.bfloat16], err


def test_flash_backend_without_fa3_runs_the_kernel():
    # Where vLLM's FA3 is absent (here, the CPU), `flash` is the Triton path, same result.
    from blend.ops import get_ops
    from blend.triton_kernels.flash import flash_varlen

    if flash_varlen() is not None:
        pytest.skip("FA3 present: the GPU tests cover it")
    kc, vc, table, q, q_pos, cu, scale, ref = make_case(6, 2, 64, torch.float32, [29, 40],
                                                        [7, 40], 8, seed=21)
    got = get_ops("flash").attention(q, kc, vc, q_pos, cu, table, [29, 40], scale)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
