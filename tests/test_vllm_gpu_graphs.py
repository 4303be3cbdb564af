"""`cuda_graphs` inside GPU vLLM: the blend's steady layers replayed from CUDA graphs keep
r=1.0 at plain vLLM by the master check, and the graphs really ran.

Apart from `tests/test_vllm_gpu.py` (the suite issue 21 runs twice in a row) while the graphs
are opt-in and unmeasured: `bash tools/gpu/device.sh graphs` runs it. Same prompts, plain
reference engine and criterion as that suite's (a); the blended engine has `cuda_graphs: true`
and sends one prompt per `generate`, so each blend's rows (about 700 at r=1.0) fit a bucket
instead of ten prompts' rows running eagerly in one step.
"""

from __future__ import annotations

import time

import pytest
from test_vllm_gpu import (  # noqa: F401 - cases and reference are the fixtures used here
    ENGINE,
    GEN,
    LOGPROBS,
    _report,
    _sp,
    cases,
    reference,
)
from test_vllm_metrics import _one

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]


@pytest.fixture(scope="module")
def graphed(smollm2_path, tmp_path_factory, reference):  # noqa: F811 - the imported fixture
    from vllm import LLM

    import blend

    ktc = blend.kv_transfer_config(
        store={"backend": "local", "path": str(tmp_path_factory.mktemp("kv"))},
        on_miss="compute", admit="always", unmarked="none",
        cache_fuse_metadata={"recomp_ratio": 0.15, "cuda_graphs": True})
    t = time.time()  # after the plain reference engine has gone (the fixture order)
    engine = LLM(model=smollm2_path, kv_transfer_config=ktc, disable_log_stats=False, **ENGINE)
    print(f"graphed blend engine start (captures included): {time.time() - t:.0f} s")
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine


def test_graphs_exact_at_ratio_one(graphed, cases, reference):  # noqa: F811
    import blend
    from blend.exactness import Answer, answer_from_vllm, judge

    outs = []
    for ids, spans in cases["exact"]:
        p = blend.BlendPrompt(ids, spans, cache_fuse_metadata={"recomp_ratio": 1.0})
        outs += graphed.generate([p], _sp(logprobs=LOGPROBS), use_tqdm=False)
    for i, o in enumerate(outs):
        rep = _report(o)
        assert rep and rep["chunks"] == 4 and rep["num_external"] > 0, (i, rep)
    graphed.generate({"prompt_token_ids": [1, 2, 3]}, _sp(max_tokens=1), use_tqdm=False)
    replays = _one(graphed.get_metrics(), "vllm:cacheblend_graph_replays")
    res = judge([Answer(r["tokens"], r["rows"]) for r in reference["exact"]],
                [answer_from_vllm(o) for o in outs], dtype=ENGINE["dtype"])
    print(f"r=1.0 with cuda_graphs ({len(outs)} prompts x {GEN} tokens, {replays:.0f} layer "
          f"replays):\n{res.table()}\n{res.summary()}")
    assert replays >= len(outs) * 20, replays  # ~27 steady layers of 30 per blend
    assert res.passed, res.summary()
