"""The blend on a real model (SmolLM2, fp32) against the invariants that define it."""

import pytest
import torch
from blend_case import QUESTION, SYSTEM, kl

from blend.offline import HFBlender


def test_full_mode_is_the_models_own_forward(hb, full):
    ids = torch.tensor([full.layout.token_ids])
    with torch.no_grad():
        ref = hb.model(ids).logits[0, full.layout.context_len:]
    torch.testing.assert_close(full.logits, ref.float(), rtol=1e-3, atol=5e-4)


def test_ratio_one_reproduces_full_prefill(hb, chunks, full):
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 1.0})
    assert kl(full.logits, res.logits) < 1e-4
    assert res.selected.tolist() == list(range(full.layout.context_len))
    a = hb.generate(SYSTEM, chunks, QUESTION, "full", max_new_tokens=32)
    b = hb.generate(SYSTEM, chunks, QUESTION, "blend", 32, {"recomp_ratio": 1.0})
    assert a == b and len(a) > 4


def test_ratio_zero_is_full_reuse(hb, chunks, full):
    reuse = hb.prefill(SYSTEM, chunks, QUESTION, "reuse")
    zero = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 0.0})
    assert zero.selected.numel() == 0
    torch.testing.assert_close(zero.logits, reuse.logits, rtol=1e-4, atol=1e-4)
    assert kl(full.logits, reuse.logits) > 1e-3  # reuse really differs: the test can fail


def test_blend_beats_reuse_and_selects_the_ratio(hb, chunks, full):
    reuse = hb.prefill(SYSTEM, chunks, QUESTION, "reuse")
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 0.3})
    n_ctx = full.layout.context_len
    assert res.selected.numel() == -(-3 * n_ctx // 10)
    assert kl(full.logits, res.logits) < kl(full.logits, reuse.logits)
    dev = res.trace.deviation_dense(1, 0, n_ctx)
    assert torch.isfinite(dev).all()
    chosen = dev[res.selected]
    unchosen = dev[[i for i in range(n_ctx) if i not in set(res.selected.tolist())]]
    assert chosen.min() >= unchosen.max()  # the HKVD set is the top of the deviation


def test_missed_chunk_tokens_always_recomputed(smollm2_fp32, chunks):
    model, tok = smollm2_fp32
    hb = HFBlender(model, tok, on_miss="recompute")
    hb.precompute(chunks[:1] + chunks[2:])  # chunk 1 (prompt segment 2) stays missing
    hb.chunk_kv(hb.layout(SYSTEM, chunks, QUESTION).prefix)
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 0.05})
    assert res.missed_chunks == [2]
    start, end = res.layout.spans[1]
    sel = set(res.selected.tolist())
    assert set(range(start, end)) <= sel
    assert len(sel) > end - start  # plus the HKVD tokens of the cached chunks


def test_nothing_cached_blend_is_full_prefill(smollm2_fp32, chunks, full):
    model, tok = smollm2_fp32
    hb = HFBlender(model, tok, on_miss="recompute")
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 0.1})
    assert kl(full.logits, res.logits) < 1e-4


def test_gradual_filtering_nests(hb, chunks):
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend",
                     {"check_layers": [1, 3, 6], "recomp_ratios": [0.4, 0.25, 0.1]})
    pos = {layer: set(res.trace.deviation[layer][0].tolist()) for layer in (1, 3, 6)}
    assert pos[3] < pos[1] and pos[6] < pos[3]
    assert set(res.selected.tolist()) < pos[6]
    n = res.layout.context_len
    assert res.selected.numel() == -(-n // 10)


def test_sink_tokens_forced(hb, chunks):
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 0.0, "sink_tokens": 2})
    want = {s + i for s, _ in res.layout.spans for i in range(2)}
    assert set(res.selected.tolist()) == want


@pytest.mark.parametrize("metric", ["k_l2", "k_l1", "kv_l2"])
def test_other_deviation_metrics_run(hb, chunks, full, metric):
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", {"recomp_ratio": 0.3, "deviation": metric})
    reuse = hb.prefill(SYSTEM, chunks, QUESTION, "reuse")
    assert kl(full.logits, res.logits) < kl(full.logits, reuse.logits)


def test_qwen2_adapter_matches_model(qwen05_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen05_path)
    model = AutoModelForCausalLM.from_pretrained(qwen05_path, dtype=torch.float32).eval()
    hb = HFBlender(model, tok)
    chunks = ["Paris is the capital of France.", "Berlin is the capital of Germany."]
    full = hb.prefill("Answer briefly.", chunks, "What is the capital of Germany?", "full")
    with torch.no_grad():
        ref = model(torch.tensor([full.layout.token_ids])).logits[0, full.layout.context_len:]
    torch.testing.assert_close(full.logits, ref.float(), rtol=1e-3, atol=1e-3)
    one = hb.prefill("Answer briefly.", chunks, "What is the capital of Germany?", "blend",
                     {"recomp_ratio": 1.0})
    assert kl(full.logits, one.logits) < 1e-4
    args = ("Answer briefly.", chunks, "What is the capital of Germany?")
    assert hb.generate(*args, "full", 8) == hb.generate(*args, "blend", 8, {"recomp_ratio": 1.0})


@pytest.mark.parametrize("meta", [{"recomp_ratio": 0.15}, {"recomp_ratio": 1.0},
                                  {"selection": "hybrid", "check_layers": [1, 3],
                                   "recomp_ratios": [0.35, 0.13]},
                                  {"selection": "cheap", "check_layers": [4],
                                   "recomp_ratio": 0.05}])
def test_dense_attention_only_where_promised(smollm2_fp32, chunks, hb, meta):
    # The flash backend runs one causal FA3 call where the blender says a phase is dense
    # (each request's queries are its last positions, all of them). Check that promise on
    # every such call, and that routing through it changes nothing.
    from dataclasses import replace

    from blend.ops import get_ops

    ref = get_ops("torch")
    calls = []

    def dense(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens, scale):
        for b, n in enumerate(seq_lens):
            got = q_pos[cu_q[b]:cu_q[b + 1]].tolist()
            assert got == list(range(n - len(got), n)), "a dense call with non-dense queries"
        calls.append(len(q_pos))
        return ref.attention(q, k_cache, v_cache, q_pos, cu_q, block_table, seq_lens, scale)

    model, tok = smollm2_fp32
    checked = HFBlender(model, tok)
    checked.blender.ops = replace(ref, attention_dense=dense)
    checked.precompute(chunks)
    got = checked.prefill(SYSTEM, chunks, QUESTION, "blend", meta)
    want = hb.prefill(SYSTEM, chunks, QUESTION, "blend", meta)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert calls, "no phase was dense"
