"""The steady layers' CUDA-graph path against the eager layer loop, on the same inputs.

On CPU the graph path runs its static, padded inputs eagerly (the Triton kernels
interpreted): this checks the padding (rows past the run write nowhere and belong to no
request) and the refresh of the inputs between runs of one bucket. On CUDA it captures
and replays (`-m gpu`, the harness's `units`).
"""

from __future__ import annotations

import pytest
import torch

from blend.blender import Blender, BlendSeq
from blend.config import BlendConfig
from blend.kv import PagedKV
from blend.models import adapter_for
from blend.ops import get_ops

HAS_CUDA = torch.cuda.is_available()
# The CPU cases run Triton interpreted, which conftest turns on only without a GPU.
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="CPU cases: Triton's interpreter is off with CUDA")


def tiny_llama(device: str, dtype: torch.dtype, layers: int = 4, head_dim: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4 * head_dim, intermediate_size=3 * head_dim,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim, vocab_size=128, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def case(adapter, lens, gen, capacity, block_size=8):
    """A cache holding "cached" KV for every position, and sequences over it: 4 forced
    system tokens, the rest cached, the last 3 tokens a question with logits."""
    kv = PagedKV.like(adapter, capacity, block_size)
    for layer in range(adapter.num_layers):
        for t in kv.layer(layer):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    seqs = []
    for n in lens:
        forced = torch.zeros(n, dtype=torch.bool)
        forced[:4] = True
        ids = torch.randint(0, 128, (n,), generator=gen)
        seqs.append(BlendSeq(ids, 0, kv.allocate(n), forced, num_outputs=3))
    return kv, seqs


def clone_kv(kv: PagedKV) -> PagedKV:
    out = PagedKV.__new__(PagedKV)
    out.__dict__.update(kv.__dict__)
    out.k, out.v = [t.clone() for t in kv.k], [t.clone() for t in kv.v]
    return out


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def compare(model, meta, runs, buckets, blend=True, expect_replays=True, rel=1e-5):
    """Each run (a list of sequence lengths) eagerly and on the graph path, one graph
    blender (one cache) across the runs; logits and every layer's cache must agree."""
    a = adapter_for(model)
    ops = get_ops("triton", a.device)
    cfg = BlendConfig.from_dict(meta)
    eager = Blender(a, cfg, ops=ops)
    graphed = Blender(a, BlendConfig.from_dict({**meta, "cuda_graphs": True}), ops=ops)
    gen = torch.Generator().manual_seed(1)
    capacity = max(sum(lens) + 8 * len(lens) for lens in runs)  # whole blocks per sequence
    kv_g = graphs = None
    for lens in runs:
        kv, seqs = case(a, lens, gen, capacity)
        if kv_g is None:
            kv_g = kv  # the graphs are bound to one cache: later runs copy theirs into it
            graphs = graphed.use_graphs(kv_g, max_blocks=-(-capacity // 8), buckets=buckets)
        else:
            for dst, src in zip(kv_g.k + kv_g.v, kv.k + kv.v):
                dst.copy_(src)
        kv_e = clone_kv(kv_g)
        before = graphs.replays
        want = eager.run(seqs, kv_e, blend=blend)
        got = graphed.run(seqs, kv_g, blend=blend)
        assert (graphs.replays > before) == expect_replays
        if want.logits is not None:
            close(got.logits, want.logits, rel)
        for w, g in zip(want.selected, got.selected):
            assert torch.equal(w, g)
        for layer in range(a.num_layers):
            for w, g in zip(kv_e.layer(layer), kv_g.layer(layer)):
                close(g, w, rel)
    return graphs


@pytest.fixture(scope="module")
def cpu_model():
    return tiny_llama("cpu", torch.float32, layers=5)


@cpu_only
def test_blend_padded_buckets_match_eager(cpu_model):
    """Two requests padded into a 64-row bucket (39 rows), then one into 32, then two into
    64 again with fewer rows (33): the bucket's inputs refreshed, stale rows past the run."""
    meta = {"recomp_ratio": 0.3, "check_layers": [1], "attention_backend": "triton"}
    graphs = compare(cpu_model, meta, [[52, 41], [27], [45, 30]], buckets=(8, 32, 64))
    assert graphs.replays == 3 * 2  # layers 2 and 3: after the check, before the last


@cpu_only
def test_cheap_and_plain_prefill_start_at_layer_zero(cpu_model):
    cheap = {"selection": "cheap", "recomp_ratio": 0.2, "check_layers": [2], "sink_tokens": 2,
             "attention_backend": "triton"}
    compare(cpu_model, cheap, [[40, 33]], buckets=(32, 64))
    compare(cpu_model, {"attention_backend": "triton"}, [[21, 17]], buckets=(64,), blend=False)


@cpu_only
def test_runs_over_the_largest_bucket_stay_eager(cpu_model):
    meta = {"recomp_ratio": 1.0, "check_layers": [1], "attention_backend": "triton"}
    compare(cpu_model, meta, [[45, 30]], buckets=(16,), expect_replays=False)


@cpu_only
def test_graphs_need_the_triton_backend(cpu_model):
    a = adapter_for(cpu_model)
    b = Blender(a, BlendConfig(cuda_graphs=True, attention_backend="torch"))
    assert b.use_graphs(PagedKV.like(a, 16), 4) is None
    assert Blender(a, BlendConfig()).use_graphs(PagedKV.like(a, 16), 4) is None  # not asked


@pytest.mark.gpu
@pytest.mark.parametrize("meta", [
    {"recomp_ratio": 0.15, "check_layers": [1]},
    {"selection": "cheap", "recomp_ratio": 0.1, "check_layers": [2], "sink_tokens": 4},
])
def test_gpu_capture_and_replay_match_eager(meta):
    """Captured graphs replayed over three runs of two buckets, bf16 on CUDA: the same
    logits and caches as the eager loop up to the GEMMs' kernel choice per row count."""
    model = tiny_llama("cuda", torch.bfloat16, layers=6, head_dim=128)
    meta = {**meta, "attention_backend": "triton"}
    compare(model, meta, [[1500, 913], [700], [1700, 1211]], buckets=(256, 512, 1024),
            rel=2e-2)
