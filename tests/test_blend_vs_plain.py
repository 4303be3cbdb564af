"""The paged blender against plain CacheBlend written independently in dense PyTorch.

`tests/reference/plain_cacheblend.py` shares no code with `blend/`: if both pick the same
HKVD tokens and give the same question logits on real text, the selection,
re-rotation, mask and fusion of the product are what CacheBlend specifies.
"""

import pytest
from blend_case import kl as _kl
from reference.plain_cacheblend import plain_blend

SYSTEM = "Answer the question using only the documents below."
QUESTION = "What does the document about exceptions say? Answer in one sentence."


@pytest.fixture(scope="module")
def hb(smollm2_fp32):
    from blend.offline import HFBlender

    model, tok = smollm2_fp32
    return HFBlender(model, tok)


@pytest.mark.parametrize("meta", [
    {"recomp_ratio": 0.15},
    {"recomp_ratio": 0.1, "check_layers": [1, 3], "recomp_ratios": [0.3, 0.1]},
    {"recomp_ratio": 0.2, "check_layers": [2]},
], ids=["r0.15", "gradual", "layer2"])
def test_same_tokens_and_logits_as_plain_cacheblend(hb, prose_chunks, meta):
    chunks = prose_chunks[2:6]
    res = hb.prefill(SYSTEM, chunks, QUESTION, "blend", meta)
    lay = res.layout
    checks = tuple(meta.get("check_layers", [1]))
    ratios = tuple(meta.get("recomp_ratios", [meta["recomp_ratio"]]))
    logits, selected = plain_blend(hb.model, lay.prefix, lay.chunks, lay.suffix, ratios, checks)
    assert selected.numel() > 0
    assert sorted(res.selected.tolist()) == selected.tolist()
    assert _kl(logits, res.logits) < 1e-5
    full = hb.prefill(SYSTEM, chunks, QUESTION, "full")
    assert abs(_kl(full.logits, logits) - _kl(full.logits, res.logits)) < 1e-5
