"""Foundation smoke test: real vLLM (CPU) and `transformers` agree on the converted model."""

from __future__ import annotations

import pytest
import torch

from blend.device import shutdown_llm

PROMPTS = [
    "The capital of France is",
    "Python is a programming language that",
]


@pytest.mark.vllm
def test_vllm_greedy_matches_transformers(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    llm = LLM(model=smollm2_path, dtype="bfloat16", enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.3, seed=0)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    finally:
        shutdown_llm(llm)  # now: the next modules start engines of their own
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert list(out.prompt_token_ids) == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        got = list(out.outputs[0].token_ids)
        assert got[:8] == ref[:8], (prompt, tok.decode(got), tok.decode(ref))
