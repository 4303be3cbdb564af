"""RoPE re-rotation kernel vs reference: NeoX / GPT-J, partial rotary, scaled tables, strided caches."""

from __future__ import annotations

import pytest
import torch

from blend.triton_kernels._testing import paged_cache, slots_of, sorted_positions
from blend.triton_kernels.rope import delta_cos_sin, rerotate_k, rerotate_k_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inv_freq(rot_dim: int, base: float = 10000.0, factor: float = 1.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)) / factor


def run_case(h, dim, rot, dtype, lens, nsel, block_size, is_neox, heads_first=False, seed=0,
             factor=1.0):
    gen = torch.Generator().manual_seed(seed)
    kc, _, table = paged_cache(lens, block_size, h, dim, dtype, DEV, heads_first, gen=gen)
    slots = torch.cat([slots_of(table, block_size, b, sorted_positions(n, s, gen))
                       for b, (n, s) in enumerate(zip(lens, nsel))])
    max_delta = 5000
    delta = torch.randint(0, max_delta + 1, (slots.numel(),), generator=gen).to(DEV)
    cs = delta_cos_sin(inv_freq(rot, factor=factor).float().to(DEV), max_delta)
    ref = kc.clone()
    rerotate_k_ref(ref, slots, delta, cs, is_neox)
    rerotate_k(kc, slots, delta, cs, is_neox)
    # Same fp32 math; 16-bit results may differ by one rounding step (FMA contraction, and
    # the interpreter's float->bf16 cast); slots not selected must be untouched, bit for bit.
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(kc, ref, rtol=tol, atol=tol)
    untouched = torch.ones(kc.shape[:2], dtype=torch.bool, device=DEV)
    untouched[slots // block_size, slots % block_size] = False
    assert torch.equal(kc[untouched], ref[untouched])


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dim,rot", [(64, 64), (128, 128), (64, 32), (128, 48)])
def test_styles_and_partial_rotary(is_neox, dim, rot):
    run_case(3, dim, rot, torch.bfloat16, lens=[29, 17], nsel=[13, 17], block_size=8,
             is_neox=is_neox, seed=dim + rot)


def test_strided_fp32_scaled_and_empty():
    run_case(2, 64, 64, torch.float32, lens=[21], nsel=[9], block_size=4, is_neox=True,
             heads_first=True, factor=8.0)
    run_case(2, 64, 64, torch.float16, lens=[21], nsel=[0], block_size=4, is_neox=False)


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic(is_neox, dtype):
    run_case(8, 128, 128, dtype, lens=[8256, 2000], nsel=[8000, 1999], block_size=16,
             is_neox=is_neox, seed=3)
    run_case(8, 128, 64, dtype, lens=[3001], nsel=[3001], block_size=16, is_neox=is_neox,
             heads_first=True, seed=4)
