"""Trace JSON: offline export round-trips, and a batched blend splits back into per-request traces."""

import json
import math

import pytest
import torch

from blend.blender import BlendSeq, BlendTrace
from blend.chunk_placement import ChunkPlacement, layer_loader
from blend.config import BlendConfig
from blend.kv import PagedKV, slots_for
from blend.offline import HFBlender
from blend.trace import (
    load_dir,
    load_trace,
    timed_layer_hook,
    trace_from_result,
    write_batch,
)

SYSTEM = "You are a helpful assistant. Answer the question using the documents."
META = {"check_layers": [1, 3], "recomp_ratios": [0.5, 0.2]}


@pytest.fixture(scope="module")
def hb(smollm2_fp32):
    model, tok = smollm2_fp32
    return HFBlender(model, tok, cache_fuse_metadata=META)


def test_offline_trace_round_trips(hb, prose_chunks, tmp_path):
    res = hb.prefill(SYSTEM, prose_chunks[:3], "What does the first document say?", "blend")
    doc = trace_from_result(res, "r1")
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(doc, allow_nan=False))  # strict JSON: NaN became null
    t = load_trace(path)
    n = res.layout.context_len
    assert t.context == (0, n) and t.check_layers == [1, 3]
    assert t.selected == res.selected.tolist()
    assert len(t.selected) < n  # something was filtered: the trace can tell
    assert [c[:2] for c in t.chunks] == [tuple(s) for s in res.layout.spans]
    # layer 1 measures every context token; layer 3 only the survivors of layer 1
    assert not any(math.isnan(x) for x in t.deviation[1])
    measured3 = [p for p, x in enumerate(t.deviation[3]) if not math.isnan(x)]
    assert len(measured3) == math.ceil(0.5 * n)
    torch.testing.assert_close(torch.tensor(t.deviation[1]), res.trace.deviation_dense(1, 0, n))
    assert t.timings_ms["blend"] > 0  # the offline API's own timing keys vary; blend is always there
    with pytest.raises(ValueError):
        load_trace({"version": 99})


def _blend_seq(hb, kv, system, chunks, question):
    """One sequence planned the way the connector worker plans it (prefix forced, chunks placed)."""
    layout = hb.layout(system, chunks, question)
    ctx = layout.context_len
    row = kv.allocate(ctx)
    forced = torch.zeros(ctx, dtype=torch.bool)
    forced[: len(layout.prefix)] = True
    placements = []
    for (s, e), ids in zip(layout.spans, layout.chunks):
        slots = slots_for(row, torch.arange(s, e), kv.block_size)
        placements.append(ChunkPlacement(hb.chunk_kv(ids), slots, s))
    return BlendSeq(torch.tensor(layout.token_ids[:ctx]), 0, row, forced), placements


class _Req:
    def __init__(self, rid, seq):
        self.req_id, self.chunks = rid, []


def test_batched_blend_splits_per_request(hb, prose_chunks, tmp_path):
    cfg = BlendConfig.from_dict(META)
    prompts = [(prose_chunks[:3], "What is the first document about?"),
               (prose_chunks[3:7], "Which statement is described last?")]
    single = []
    for chunks, q in prompts:  # each request alone
        kv = PagedKV.like(hb.adapter, 2048)
        seq, pl = _blend_seq(hb, kv, SYSTEM, chunks, q)
        tr = BlendTrace()
        hb.blender.run([seq], kv, blend=True, trace=tr, layer_hook=layer_loader(hb.blender, kv, pl))
        single.append((seq, tr))
    kv = PagedKV.like(hb.adapter, 4096)  # both in one batch, as the worker runs a step
    seqs, pls = zip(*[_blend_seq(hb, kv, SYSTEM, c, q) for c, q in prompts])
    tr = BlendTrace()
    hook = timed_layer_hook(layer_loader(hb.blender, kv, [p for pl in pls for p in pl]), tr)
    hb.blender.run(list(seqs), kv, blend=True, trace=tr, layer_hook=hook)
    L = hb.adapter.num_layers
    assert [f"load.{i}" in tr.timings_ms for i in range(L)] == [True] * L
    assert 0 < tr.timings_ms["layers"] <= tr.timings_ms["blend"]
    assert sum(tr.seq_token_layers) == tr.token_layers
    reqs = [_Req(f"req-{i}", s) for i, s in enumerate(seqs)]
    docs = write_batch(tmp_path, tr, seqs, cfg, reqs)
    back = load_dir(tmp_path)
    assert sorted(back) == ["req-0", "req-1"]
    for doc, (seq, one) in zip(docs, single):
        t = back[doc["req_id"]]
        n = seq.end
        assert t.selected == one.selected[0].tolist()
        # Each request's measured compute (bench/quality_gpu.py) is its own, batched or not.
        assert doc["token_layers"] == one.token_layers > 0
        assert doc["blended_tokens"] == seq.end - seq.start and doc["probes"] == 0
        for layer in (1, 3):
            torch.testing.assert_close(torch.tensor(t.deviation[layer]),
                                       one.deviation_dense(layer, 0, n), equal_nan=True,
                                       rtol=1e-3, atol=1e-4)
