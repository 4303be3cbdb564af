"""Chunk placement kernel vs reference: many sources, partial pieces, deltas, layer ranges."""

from __future__ import annotations

import pytest
import torch

from blend.triton_kernels._testing import paged_cache, slots_of
from blend.triton_kernels.placement import (
    Placement,
    PlacePiece,
    extract_chunks_ref,
    place_chunks_ref,
)
from blend.triton_kernels.rope import delta_cos_sin

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inv_freq(rot_dim: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))


def run_case(layers, h, dim, rot, dtype, chunks, block_size, is_neox, heads_first=False,
             place_layers=None, seed=0):
    """`chunks`: (source length, lo, hi, delta) per piece; pieces go to one request in order."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(hi - lo for _, lo, hi, _ in chunks) + 5
    caches, refs = [], []
    table = None
    for _ in range(layers):
        kc, vc, table = paged_cache([total], block_size, h, dim, dtype, DEV, heads_first,
                                    gen=gen)
        caches.append((kc, vc))
        refs.append((kc.clone(), vc.clone()))
    pieces, pos = [], 3  # positions 0..2 and the tail stay untouched
    for n, lo, hi, delta in chunks:
        src = torch.randn((layers, 2, n, h, dim), generator=gen).to(dtype).to(DEV)
        slots = slots_of(table, block_size, 0, torch.arange(pos, pos + hi - lo)).cpu()
        pieces.append(PlacePiece(src, lo, hi, slots, delta))
        pos += hi - lo
    max_delta = max(d for *_, d in chunks) + 1
    cs = delta_cos_sin(inv_freq(rot).float().to(DEV), max_delta)
    which = range(layers) if place_layers is None else place_layers
    place_chunks_ref(refs, pieces, which, cs, is_neox)
    Placement(caches, pieces, cs, is_neox).place(which)
    # Same fp32 rotation as rerotate_k (one rounding step apart at most, FMA contraction);
    # V and unrotated dims are copies, and everything not placed is untouched, bit for bit.
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for (k, v), (rk, rv) in zip(caches, refs):
        torch.testing.assert_close(k, rk, rtol=tol, atol=tol)
        assert torch.equal(v, rv)
        assert torch.equal(k[..., rot:], rk[..., rot:])
    if place_layers is not None:  # layers outside the range are not written at all
        for layer in set(range(layers)) - set(place_layers):
            assert torch.equal(caches[layer][0], refs[layer][0])


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dim,rot", [(64, 64), (48, 32)])
def test_many_sources_and_deltas(is_neox, dim, rot):
    run_case(3, 2, dim, rot, torch.bfloat16,
             chunks=[(13, 0, 13, 0), (29, 5, 29, 13), (7, 0, 3, 811), (1, 0, 1, 40)],
             block_size=8, is_neox=is_neox, seed=dim)


def test_layer_range_fp32_strided():
    run_case(4, 3, 32, 32, torch.float32, chunks=[(11, 2, 11, 7), (9, 0, 9, 0)],
             block_size=4, is_neox=True, heads_first=True, place_layers=range(1, 3), seed=5)


def test_single_layer_and_no_pieces():
    run_case(2, 1, 16, 16, torch.float32, chunks=[(5, 0, 5, 3)], block_size=16,
             is_neox=False, place_layers=range(1, 2), seed=6)
    kc, vc, _ = paged_cache([4], 4, 1, 16, torch.float32, DEV)
    cs = delta_cos_sin(inv_freq(16).float().to(DEV), 4)
    before = kc.clone()
    Placement([(kc, vc)], [], cs, True).place(range(1))
    assert torch.equal(kc, before)


def test_refuses_mixed_dtype():
    kc, vc, _ = paged_cache([4], 4, 1, 16, torch.float32, DEV)
    src = torch.zeros((1, 2, 4, 1, 16), dtype=torch.float16, device=DEV)
    cs = delta_cos_sin(inv_freq(16).float().to(DEV), 4)
    with pytest.raises(ValueError, match="dtype"):
        Placement([(kc, vc)], [PlacePiece(src, 0, 4, torch.arange(4), 0)], cs, True)


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False])
def test_gpu_realistic(is_neox):
    run_case(4, 8, 128, 128, torch.bfloat16,
             chunks=[(1024, 0, 1024, 0), (997, 0, 997, 1024), (1500, 300, 1500, 2021)],
             block_size=16, is_neox=is_neox, seed=7)
    run_case(3, 8, 128, 64, torch.bfloat16, chunks=[(2049, 1, 2049, 4000)], block_size=16,
             is_neox=is_neox, heads_first=True, place_layers=range(1, 3), seed=8)


def extract_case(layers, h, dim, rot, dtype, pieces_spec, block_size, is_neox, heads_first=False,
                 seed=0):
    """`extract` vs `extract_chunks_ref` on a random cache; `pieces_spec`: (n, lo, hi, delta),
    each piece read from cache positions `delta + lo ..` as a chunk placed at `delta` would be."""
    gen = torch.Generator().manual_seed(seed)
    total = max(d + hi for _, _, hi, d in pieces_spec) + 3
    caches, table = [], None
    for _ in range(layers):
        kc, vc, table = paged_cache([total], block_size, h, dim, dtype, DEV, heads_first, gen=gen)
        caches.append((kc, vc))
    pieces, refs = [], []
    for n, lo, hi, delta in pieces_spec:
        slots = slots_of(table, block_size, 0, torch.arange(delta + lo, delta + hi)).cpu()
        pieces.append(PlacePiece(torch.zeros((layers, 2, n, h, dim), dtype=dtype, device=DEV),
                                 lo, hi, slots, delta))
        refs.append(PlacePiece(torch.zeros((layers, 2, n, h, dim), dtype=dtype, device=DEV),
                               lo, hi, slots, delta))
    cs = delta_cos_sin(inv_freq(rot).float().to(DEV), max(d for *_, d in pieces_spec) + 1)
    before = [(k.clone(), v.clone()) for k, v in caches]
    extract_chunks_ref(caches, refs, range(layers), cs, is_neox)
    Placement(caches, pieces, cs, is_neox).extract(range(layers))
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for p, r in zip(pieces, refs):
        torch.testing.assert_close(p.src, r.src, rtol=tol, atol=tol)
        assert torch.equal(p.src[:, 1], r.src[:, 1])  # V is a copy
        assert not p.src[:, :, :p.lo].any() and not p.src[:, :, p.hi:].any()  # rows outside
    for (k, v), (bk, bv) in zip(caches, before):  # the cache is only read
        assert torch.equal(k, bk) and torch.equal(v, bv)
    return caches, pieces, cs


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dim,rot", [(64, 64), (48, 32)])
def test_extract_matches_reference(is_neox, dim, rot):
    extract_case(3, 2, dim, rot, torch.bfloat16,
                 [(13, 0, 13, 0), (29, 5, 29, 40), (7, 0, 3, 811), (1, 0, 1, 9)],
                 block_size=8, is_neox=is_neox, seed=dim)
    extract_case(2, 3, 32, 32, torch.float32, [(11, 2, 11, 7)], block_size=4, is_neox=is_neox,
                 heads_first=True, seed=3)


def test_extract_inverts_place():
    """A chunk placed at position d and extracted back is the stored chunk (fp32 round-off)."""
    gen = torch.Generator().manual_seed(11)
    layers, h, dim, n, d, bs = 2, 3, 32, 21, 37, 8
    kc_vc, table = [], None
    for _ in range(layers):
        kc, vc, table = paged_cache([d + n + 2], bs, h, dim, torch.float32, DEV, gen=gen)
        kc_vc.append((kc, vc))
    src = torch.randn((layers, 2, n, h, dim), generator=gen).to(DEV)
    slots = slots_of(table, bs, 0, torch.arange(d, d + n)).cpu()
    cs = delta_cos_sin(inv_freq(dim).float().to(DEV), d + 1)
    Placement(kc_vc, [PlacePiece(src, 0, n, slots, d)], cs, True).place(range(layers))
    back = torch.zeros_like(src)
    Placement(kc_vc, [PlacePiece(back, 0, n, slots, d)], cs, True).extract(range(layers))
    torch.testing.assert_close(back, src, rtol=1e-5, atol=1e-5)
    # Mutation check: the wrong delta does not invert.
    wrong = torch.zeros_like(src)
    Placement(kc_vc, [PlacePiece(wrong, 0, n, slots, d - 1)], cs, True).extract(range(layers))
    assert not torch.allclose(wrong[:, 0], src[:, 0], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("is_neox", [True, False])
def test_gpu_extract_realistic(is_neox):
    extract_case(4, 8, 128, 128, torch.bfloat16, [(1024, 0, 1024, 0), (997, 3, 996, 1024)],
                 block_size=16, is_neox=is_neox, seed=9)
