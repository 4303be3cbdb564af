"""Shared test set-up: Triton in interpreter mode without a GPU, markers, model fixtures."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run through numpy on CPU. Must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# vLLM CPU sizes its KV cache from memory it can see; keep it small on 24 GiB machines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# The environment as the session started, for child processes. An engine created in this
# process (test_smoke_vllm, the module fixtures) rewrites os.environ for its own children
# and never restores it: LD_PRELOAD=torch's libgomp, VLLM_WORKER_MULTIPROC_METHOD,
# LOCAL_WORLD_SIZE, TORCHINDUCTOR_*, ... (vllm/platforms/cpu.py). A child started later
# from os.environ would then run differently in the full suite than alone.
START_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a child that aborts dumps its stacks


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """The environment for test child processes: the session's own, not vLLM's rewrites."""
    return dict(START_ENV)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from blend.assets import SMOLLM2, model_path

    return str(model_path(SMOLLM2.name))


@pytest.fixture(scope="session")
def qwen05_path() -> str:
    from blend.assets import QWEN25_05B, model_path

    return str(model_path(QWEN25_05B.name))


@pytest.fixture(scope="session")
def tok(smollm2_path):
    """SmolLM2's tokenizer (the vLLM modules build their prompts with it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_path):
    """(model, tokenizer) in fp32: exactness checks need fp32 round-off, not bf16's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def prose_chunks() -> list[str]:
    """Real English prose: passages of Python's own language reference."""
    from pydoc_data.topics import topics

    names = ["assignment", "class", "exceptions", "for", "if", "import", "lambda", "while"]
    return [" ".join(topics[n].split()[:60]) for n in names]


@pytest.fixture(scope="module")
def hb(smollm2_fp32):
    """An offline blender on SmolLM2 fp32 (a module may define its own `hb`)."""
    from blend.offline import HFBlender

    model, tok = smollm2_fp32
    return HFBlender(model, tok)


@pytest.fixture(scope="module")
def chunks(prose_chunks):
    return prose_chunks[:4]


@pytest.fixture(scope="module")
def full(hb, chunks):
    """Full prefill of the shared case (`blend_case.SYSTEM`, four chunks, `QUESTION`)."""
    from blend_case import QUESTION, SYSTEM

    return hb.prefill(SYSTEM, chunks, QUESTION, "full")
