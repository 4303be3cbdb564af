"""The `selection` policies on a real model (SmolLM2, fp32): exact at r=1, deterministic,
batched, and the query score is the question's real attention."""

import pytest
import torch
from blend_case import QUESTION, SYSTEM, kl
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from blend.blender import BlendSeq, BlendTrace
from blend.chunk_placement import ChunkPlacement, layer_loader
from blend.config import BlendConfig, BlendConfigError
from blend.kv import PagedKV, slots_for

POLICIES = {
    "deviation": {"selection": "deviation"},
    "query": {"selection": "query"},
    "hybrid": {"selection": "hybrid", "check_layers": [1, 3], "recomp_ratios": [0.35, 0.13],
               "query_weight": 0.5},
    "cheap": {"selection": "cheap", "check_layers": [1, 2, 4], "recomp_ratio": 0.05,
              "sink_tokens": 4},
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_ratio_one_is_full_prefill_under_every_policy(hb, chunks, full, policy):
    meta = {**POLICIES[policy], "recomp_ratio": 1.0}
    if "recomp_ratios" in meta:
        meta["recomp_ratios"] = [1.0, 1.0]
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", meta)
    assert res.selected.tolist() == list(range(full.layout.context_len))
    assert kl(full.logits, res.logits) < 1e-4
    assert (res.logits.argmax(-1) == full.logits.argmax(-1)).all()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policies_beat_reuse_and_are_deterministic(hb, chunks, full, policy):
    reuse = hb.prefill(SYSTEM, chunks, QUESTION, "reuse")
    a = hb.prefill(SYSTEM, chunks, QUESTION, "blend", POLICIES[policy])
    b = hb.prefill(SYSTEM, chunks, QUESTION, "blend", POLICIES[policy])
    assert a.selected.tolist() == b.selected.tolist()
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert 0 < a.selected.numel() < full.layout.context_len
    assert kl(full.logits, a.logits) < kl(full.logits, reuse.logits)


def test_policies_choose_different_tokens(hb, chunks):
    sel = {p: hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"selection": p}).selected.tolist()
           for p in ("deviation", "query", "hybrid")}
    assert sel["deviation"] != sel["query"] != sel["hybrid"] != sel["deviation"]


def _layer1_question_mass(model, ids: list[int], n_q: int) -> torch.Tensor:
    """The question's layer-1 attention mass per key, straight from the HF modules."""
    m = model.model
    with torch.no_grad():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
        layer = m.layers[1]
        x = layer.input_layernorm(hs)
        cfg = model.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        q = layer.self_attn.q_proj(x).view(1, len(ids), -1, hd).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(1, len(ids), -1, hd).transpose(1, 2)
        cos, sin = m.rotary_emb(x, torch.arange(len(ids))[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        att = (q @ k.transpose(-1, -2)) * hd ** -0.5
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)[0, :, -n_q:]
    return att.sum((0, 1))


def test_query_score_is_the_questions_layer1_attention(hb, chunks, full):
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"selection": "query"})
    lay = full.layout
    ref = _layer1_question_mass(hb.model, lay.token_ids, len(lay.suffix))
    got = res.trace.deviation_dense(1, 0, len(lay.token_ids))
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
    ctx = lay.context_len
    chosen = got[res.selected]
    others = got[[i for i in range(ctx) if i not in set(res.selected.tolist())]]
    assert chosen.min() >= others.max()  # query selection is the top of the question's attention


def _seq(hb, kv, chunks, question):
    layout = hb.layout(SYSTEM, chunks, question)
    n = len(layout.token_ids)
    row = kv.allocate(n)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[: len(layout.prefix)] = True
    placements = [ChunkPlacement(hb.chunk_kv(ids), slots_for(row, torch.arange(s, e), kv.block_size), s)
                  for (s, e), ids in zip(layout.spans, layout.chunks)]
    return BlendSeq(torch.tensor(layout.token_ids), 0, row, forced,
                    num_outputs=len(layout.suffix)), placements


@pytest.mark.parametrize("policy", ["query", "hybrid", "cheap"])
def test_batched_equals_one_at_a_time(hb, prose_chunks, policy):
    blender = hb.blender.with_config(BlendConfig.from_dict(POLICIES[policy]))
    prompts = [(prose_chunks[:3], "What is the first document about?"),
               (prose_chunks[3:7], "Which statement is described last, and why is it useful?")]
    single = []
    for c, q in prompts:
        kv = PagedKV.like(hb.adapter, 2048)
        seq, pl = _seq(hb, kv, c, q)
        single.append(blender.run([seq], kv, blend=True, layer_hook=layer_loader(blender, kv, pl)))
    kv = PagedKV.like(hb.adapter, 4096)
    seqs, pls = zip(*[_seq(hb, kv, c, q) for c, q in prompts])
    tr = BlendTrace()
    out = blender.run(list(seqs), kv, blend=True, trace=tr,
                      layer_hook=layer_loader(blender, kv, [p for pl in pls for p in pl]))
    n0 = single[0].logits.shape[0]
    for b, one in enumerate(single):
        assert out.selected[b].tolist() == one.selected[0].tolist()
    torch.testing.assert_close(out.logits[:n0], single[0].logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.logits[n0:], single[1].logits, rtol=1e-3, atol=1e-3)
    assert tr.token_layers > 0


def test_cheap_mode_compute_share(hb, chunks):
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", POLICIES["cheap"])
    lay = res.layout
    share = res.trace.token_layers / (lay.context_len * hb.adapter.num_layers)
    # 5% by the question's attention, 4 sink tokens per chunk, and the probe's question rows
    assert 0.05 < share < 0.05 + (4 * 4 + 5 * len(lay.suffix)) / lay.context_len + 0.01
    for s, _ in lay.spans:
        assert set(range(s, s + 4)) <= set(res.selected.tolist())


@pytest.mark.parametrize("meta, needle", [
    ({"selection": "attention"}, "selection: 'attention' not in"),
    ({"query_weight": -1}, "query_weight"),
    ({"query_weight": float("inf")}, "query_weight"),
    ({"selection": "cheap", "check_layers": [1, 4], "recomp_ratios": [0.3, 0.1]},
     "recomp_ratios: selection 'cheap'"),
])
def test_bad_selection_config(meta, needle):
    with pytest.raises(BlendConfigError) as err:
        BlendConfig.from_dict(meta)
    assert needle in str(err.value)


@pytest.mark.parametrize("policy", ["deviation", "query", "hybrid", "cheap"])
def test_question_as_probes_then_prefilled_equals_question_in_the_pass(hb, chunks, policy):
    """The vLLM flow: the question probes the blend (no logits), then is prefilled over the
    fused cache. Same selection and same logits as when it rides in the pass as outputs, so
    the probes' provisional K/V writes leave nothing wrong behind."""
    blender = hb.blender.with_config(BlendConfig.from_dict(POLICIES[policy]))
    kv = PagedKV.like(hb.adapter, 2048)
    seq, pl = _seq(hb, kv, chunks, QUESTION)
    ref = blender.run([seq], kv, blend=True, layer_hook=layer_loader(blender, kv, pl))
    kv = PagedKV.like(hb.adapter, 2048)
    seq, pl = _seq(hb, kv, chunks, QUESTION)
    nq = seq.num_outputs
    probe = BlendSeq(seq.token_ids, 0, seq.block_table, seq.forced, num_probes=nq)
    tr = BlendTrace()
    out = blender.run([probe], kv, blend=True, trace=tr, layer_hook=layer_loader(blender, kv, pl))
    assert out.logits is None
    ctx = seq.end - nq
    assert out.selected[0].tolist() == ref.selected[0][ref.selected[0] < ctx].tolist()
    assert int(out.selected[0].max()) < ctx  # probes are not reported as recomputed
    after = blender.run([BlendSeq(seq.token_ids[ctx:], ctx, seq.block_table, num_outputs=nq)],
                        kv, blend=False)
    torch.testing.assert_close(after.logits, ref.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["query", "hybrid", "cheap"])
def test_without_a_question_every_policy_is_deviation(hb, chunks, policy):
    meta = {**POLICIES[policy], "recomp_ratio": 0.15}
    meta.pop("recomp_ratios", None)
    meta["check_layers"] = [1]
    runs = {}
    for name, cfg in (("dev", {**meta, "selection": "deviation"}), (policy, meta)):
        blender = hb.blender.with_config(BlendConfig.from_dict(cfg))
        kv = PagedKV.like(hb.adapter, 2048)
        seq, pl = _seq(hb, kv, chunks, QUESTION)
        ctx = seq.end - seq.num_outputs
        seq = BlendSeq(seq.token_ids[:ctx], 0, seq.block_table, seq.forced[:ctx])
        runs[name] = blender.run([seq], kv, blend=True, layer_hook=layer_loader(blender, kv, pl))
    assert runs["dev"].selected[0].tolist() == runs[policy].selected[0].tolist()


class _Req:
    def __init__(self, i):
        self.req_id, self.chunks = f"r{i}", []


@pytest.mark.parametrize("policy, layers", [("hybrid", [1, 3]), ("cheap", [4])])
def test_trace_of_a_batched_probe_blend_splits_per_request(hb, prose_chunks, tmp_path, policy,
                                                           layers):
    """The worker's trace files: the question rows (probes) are forced in the split too."""
    from blend.trace import load_dir, write_batch

    cfg = BlendConfig.from_dict(POLICIES[policy])
    blender = hb.blender.with_config(cfg)
    kv = PagedKV.like(hb.adapter, 4096)
    seqs, pls = [], []
    for c in (prose_chunks[:2], prose_chunks[2:5]):
        s, pl = _seq(hb, kv, c, "What is this about?")
        seqs.append(BlendSeq(s.token_ids, 0, s.block_table, s.forced, num_probes=s.num_outputs))
        pls += pl
    tr = BlendTrace()
    out = blender.run(seqs, kv, blend=True, trace=tr, layer_hook=layer_loader(blender, kv, pls))
    write_batch(tmp_path, tr, seqs, cfg, [_Req(0), _Req(1)])
    back = load_dir(tmp_path)
    for b, key in enumerate(("r0", "r1")):
        assert back[key].selected == out.selected[b].tolist()
        assert sorted(back[key].deviation) == layers
