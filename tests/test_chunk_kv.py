"""Re-rotated chunk K equals K computed at the new offset, for every linear RoPE variant."""

import pytest
import torch

from blend.blender import Blender
from blend.chunk_kv import compute_chunk_kv
from blend.chunk_placement import ChunkPlacement, load_all
from blend.kv import PagedKV, slots_for
from blend.models import adapter_for
from blend.models.base import UnsupportedModelError

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 256},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
}


def tiny_llama(rope: dict, model_type: str = "llama"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        model_type, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, vocab_size=300,
        max_position_embeddings=4096, rope_parameters=rope, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _k_at(blender, ids, offset):
    """Layer-0 K (post-RoPE) of `ids` placed at `offset`, computed directly."""
    a = blender.adapter
    h = a.embed(torch.tensor(ids))
    _, k, _, _ = a.qkv(0, h, torch.arange(offset, offset + len(ids)))
    return k


@pytest.mark.parametrize("kind", sorted(ROPES))
@pytest.mark.parametrize("offset", [1, 37, 1000])
def test_rerotated_k_matches_k_at_offset(kind, offset):
    model = tiny_llama(ROPES[kind])
    a = adapter_for(model)
    assert a.rope.rope_type == kind
    if kind == "yarn":
        assert model.model.rotary_emb.attention_scaling != 1.0  # mscale is really in play
    blender = Blender(a)
    ids = [5, 17, 200, 3, 99, 42, 7, 250, 11]
    chunk = compute_chunk_kv(blender, ids)
    kv = PagedKV.like(a, offset + len(ids), block_size=4)
    row = kv.allocate(offset + len(ids))
    slots = slots_for(row, torch.arange(offset, offset + len(ids)), kv.block_size)
    load_all(blender, kv, [ChunkPlacement(chunk, slots, offset)])
    k_cache, v_cache = kv.layer(0)
    got = k_cache[slots // 4, slots % 4]
    want = _k_at(blender, ids, offset)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_cache[slots // 4, slots % 4], chunk[0, 1])  # V never rotates


def test_nonlinear_rope_refused():
    model = tiny_llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        adapter_for(model)


def test_real_model_rerotation(smollm2_fp32):
    model, _ = smollm2_fp32
    blender = Blender(adapter_for(model))
    ids = list(range(1000, 1040))
    chunk = compute_chunk_kv(blender, ids)
    kv = PagedKV.like(blender.adapter, 700)
    row = kv.allocate(700)
    slots = slots_for(row, torch.arange(650, 690), kv.block_size)
    load_all(blender, kv, [ChunkPlacement(chunk, slots, 650)])
    got = kv.layer(0)[0][slots // 16, slots % 16]
    torch.testing.assert_close(got, _k_at(blender, ids, 650), rtol=1e-4, atol=2e-4)
