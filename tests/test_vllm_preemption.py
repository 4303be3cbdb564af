"""Blended requests preempted for lack of KV blocks are blended again when they resume.

A deliberately tiny KV cache (`num_gpu_blocks_override`) and long generations
force vLLM to preempt running requests; each comes back through the waiting
queue, the connector claims its context again, and its continuation must
equal the same request run alone (never preempted), at recomp_ratio=1.0 in
fp32 so any stale or missing block would show.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


def test_preempted_blends_resume_correctly(smollm2_path, tmp_path):
    from pydoc_data.topics import topics

    from vllm import LLM, SamplingParams

    import blend
    from blend.device import shutdown_llm

    ktc = blend.kv_transfer_config(store=f"local:{tmp_path}", on_miss="compute",
                                   cache_fuse_metadata={"recomp_ratio": 1.0})
    llm = LLM(model=smollm2_path, dtype="float32", enforce_eager=True, max_model_len=2048,
              num_gpu_blocks_override=17, max_num_seqs=4, enable_prefix_caching=False,
              kv_transfer_config=ktc, seed=0)
    tok = llm.get_tokenizer()
    keys = [k for k in sorted(topics) if len(topics[k]) > 1500][:9]
    docs = [" ".join(topics[k].split())[:1100] for k in keys]
    prompts = [blend.build_prompt(tok, "Answer from the documents.", docs[3 * i: 3 * i + 3],
                                  "Write a long, detailed explanation of the first document.")
               for i in range(3)]
    sp = SamplingParams(max_tokens=300, min_tokens=300, temperature=0.0)
    try:
        alone = [llm.generate(p, sp, use_tqdm=False)[0] for p in prompts]
        together = llm.generate(prompts, sp, use_tqdm=False)
    finally:
        shutdown_llm(llm)  # now, not at collection: the next module starts its own engine
    need = sum(len(p.prompt_token_ids) + 300 for p in prompts)
    assert need > 17 * 128, "the batch must not fit: no preemption otherwise"
    for a, t in zip(alone, together):
        assert (t.kv_transfer_params or {}).get("blend"), "blended"
        assert list(t.outputs[0].token_ids) == list(a.outputs[0].token_ids)
