"""The connector's chunk loader: placement equals the plain reference, tiers, no sync on CUDA."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_chunk_kv import ROPES, tiny_llama

from blend.blender import Blender, BlendSeq
from blend.chunk_kv import compute_chunk_kv
from blend.chunk_loader import LayerLoad, Piece, copy_groups, source_for
from blend.config import BlendConfig
from blend.connector.metadata import BlendRequest
from blend.connector.worker import _by_tokens
from blend.kv import PagedKV, slots_for
from blend.models import adapter_for
from blend.store import open_store
from blend.store.gpu_tier import DeviceTier, resolve_gpu_bytes
from blend.store.spec import MAX_MEMORY, MIN_MEMORY, default_memory_bytes, parse
from blend.triton_kernels.kv_fusion import fuse_kv_ref
from blend.triton_kernels.rope import rerotate_k_ref

HAS_CUDA = torch.cuda.is_available()
FP = "f" * 64


def _key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _reference(blender, kv, pieces) -> None:
    """Every layer of every piece placed with the plain-PyTorch ops, one piece at a time."""
    for layer in range(blender.adapter.num_layers):
        k_cache, v_cache = kv.layer(layer)
        for p in pieces:
            src = p.src.dev if p.src.host is None else p.src.host.to(k_cache.device)
            slots = p.slots.to(k_cache.device)
            fuse_kv_ref(k_cache, v_cache, slots, src[layer, 0, p.lo:p.hi].clone(),
                        src[layer, 1, p.lo:p.hi].clone())
            delta = torch.full((p.hi - p.lo,), p.delta, dtype=torch.int32, device=k_cache.device)
            rerotate_k_ref(k_cache, slots, delta, blender.delta_table(p.delta),
                           blender.adapter.rope.is_neox)


def _setup(device: str, backend: str | None = None):
    model = tiny_llama(ROPES["llama3"]).to(device)
    blender = Blender(adapter_for(model), BlendConfig(
        attention_backend=backend or ("triton" if device == "cuda" else "torch")))
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (13, 29, 7)]
    kvs = [compute_chunk_kv(blender, c) for c in chunks]
    return blender, chunks, kvs


def _pieces(kvs, row, bs, device, host: bool):
    """Three chunks at odd offsets; chunk 0 twice (same source, two places), chunk 1 in part."""
    dev = torch.device(device)
    srcs = []
    for i, kv in enumerate(kvs):
        t = kv.cpu().pin_memory() if host and HAS_CUDA else kv
        srcs.append(source_for(_key(str(i)), t, dev, None, False)[0])
    layout = [(0, 0, 13, 5), (1, 4, 29, 40), (2, 0, 7, 70), (0, 0, 13, 90)]
    return [Piece(srcs[i], lo, hi, slots_for(row, torch.arange(at, at + hi - lo), bs), at - lo)
            for i, lo, hi, at in layout]


@pytest.mark.parametrize("device,backend,host", [
    ("cpu", "torch", False),
    ("cpu", "triton", False),  # the one-launch Placement, in Triton's interpreter
    pytest.param("cuda", "triton", True, marks=pytest.mark.gpu),  # pinned copies, per layer
    pytest.param("cuda", "triton", False, marks=pytest.mark.gpu),  # on the GPU: one launch
    pytest.param("cuda", "torch", True, marks=pytest.mark.gpu),  # per piece, after copies
])
def test_layer_load_places_like_the_reference(device, backend, host):
    blender, _, kvs = _setup(device, backend)
    a = blender.adapter
    got, want = PagedKV.like(a, 110, 8), PagedKV.like(a, 110, 8)
    row = got.allocate(110)
    want.allocate(110)
    pieces = _pieces(kvs, row, 8, device, host=host)
    load = LayerLoad(blender, got, pieces)
    assert (load.placement is not None) == (backend == "triton")
    for layer in range(a.num_layers):
        load.hook(layer)
    load.finish(None)
    _reference(blender, want, pieces)
    for layer in range(a.num_layers):
        torch.testing.assert_close(got.layer(layer)[0], want.layer(layer)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.layer(layer)[1], want.layer(layer)[1], rtol=0, atol=0)
    assert len(load.sources) == 3  # chunk 0 placed twice, copied once


def test_source_for_uses_cpu_tensors_in_place():
    t = torch.randn(2, 2, 3, 1, 4)
    src, pinned = source_for("k", t, torch.device("cpu"), DeviceTier(1 << 20), False)
    assert src.host is None and src.dev is t and not pinned and not src.keep


def test_gpu_tier_is_off_without_cuda():
    assert resolve_gpu_bytes("auto", torch.device("cpu")) == 0
    assert resolve_gpu_bytes(1 << 30, torch.device("cpu")) == 0


def test_fetch_hands_out_the_memory_tier_entry(tmp_path):
    s = open_store({"path": str(tmp_path), "memory_bytes": "1MiB"}, FP)
    x = torch.randn(3, 2, 17, 2, 8)
    k = _key("x")
    assert s.put(k, x)
    a, b = s.fetch(k), s.fetch(k)
    assert a is not None and a.data_ptr() == b.data_ptr() and torch.equal(a, x)
    s.mem.clear()  # disk hit: read once, promoted, then served from memory
    c = s.fetch(k)
    assert torch.equal(c, x) and s.fetch(k).data_ptr() == c.data_ptr()
    assert s.fetch(_key("absent")) is None and s.fetch("not-a-key") is None
    st = s.stats()
    assert st["disk_hits"] == 1 and st["misses"] == 2 and st["errors"]["bad_key"] == 1


def test_store_spec_defaults_are_sized_from_the_machine(tmp_path):
    cfg = parse({"path": str(tmp_path)})
    assert MIN_MEMORY <= cfg["memory_bytes"] <= MAX_MEMORY
    assert cfg["pin_memory"] == "auto" and cfg["gpu_bytes"] == "auto"
    assert default_memory_bytes(8 << 30) == MIN_MEMORY
    assert default_memory_bytes(100 << 30) == 20 << 30
    assert default_memory_bytes(2 << 40) == MAX_MEMORY
    assert parse({"path": str(tmp_path), "gpu_bytes": "8GiB"})["gpu_bytes"] == 8 << 30
    assert parse({"path": str(tmp_path), "gpu_bytes": 0})["gpu_bytes"] == 0
    for bad in ("lots", -1, True):
        with pytest.raises(ValueError, match="gpu_bytes"):
            parse({"path": str(tmp_path), "gpu_bytes": bad})


def test_runs_are_bounded_by_tokens():
    def req(n):
        return BlendRequest("r", [], [], 0, n, [])

    runs = _by_tokens([req(10), req(20), req(5), req(40), req(1)], 35)
    assert [[r.num_blend for r in run] for run in runs] == [[10, 20, 5], [40], [1]]


@pytest.mark.gpu
def test_gpu_tier_refuses_what_does_not_fit():
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="store.gpu_bytes"):
        resolve_gpu_bytes(free, torch.device("cuda"))
    assert 0 <= resolve_gpu_bytes("auto", torch.device("cuda")) <= 4 << 30


@pytest.mark.gpu
def test_blend_from_pinned_host_chunks_never_syncs():
    """The connector's hot path (loader + blender) under CUDA's sync debug mode."""
    blender, chunks, kvs = _setup("cuda")
    a = blender.adapter
    kv = PagedKV.like(a, 110, 16)
    row = kv.allocate(110)
    pieces = _pieces(kvs, row, 16, "cuda", host=True)
    ids = torch.randint(0, 300, (110,))
    forced = torch.ones(110, dtype=torch.bool)
    for p in pieces:
        forced[p.delta + p.lo: p.delta + p.hi] = False
    tier = DeviceTier(1 << 30)
    for p in pieces:
        p.src.keep = p.src.host is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        load = LayerLoad(blender, kv, pieces)
        out = blender.run([BlendSeq(ids, 0, row, forced, num_outputs=4)], kv, blend=True,
                          layer_hook=load.hook)
        load.finish(tier)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert out.logits.shape[0] == 4 and torch.isfinite(out.logits).all()
    assert len(tier) == 3 and all(s.keep for s in load.copies)
    assert isinstance(tier.get(_key("0")), torch.Tensor)


@pytest.mark.parametrize("layers", [1, 2, 3, 12, 24, 32, 80])
def test_copy_groups_cover_every_layer_once_small_at_both_ends(layers):
    groups = copy_groups(layers)
    assert [g[0] for g in groups[1:]] == [g[1] for g in groups[:-1]]
    assert groups[0] == (0, 1) and groups[-1][1] == layers
    assert groups[-1][1] - groups[-1][0] == 1  # a copy-bound blend waits one layer at the end
    assert len(groups) <= 2 * (layers.bit_length() + 1)


def test_chunk_keys_of_list_and_array_slices_agree():
    import numpy as np

    from blend.keys import chunk_key, token_array

    ids = list(range(5, 3005, 3))
    arr = token_array(ids)
    assert arr.dtype == np.int64 and arr.tolist() == ids
    fp = "ab" * 32
    for s, e in [(0, 10), (17, 600), (999, 1000)]:
        assert chunk_key(fp, ids[s:e]) == chunk_key(fp, arr[s:e])
