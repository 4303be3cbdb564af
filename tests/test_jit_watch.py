"""The post-start-up compile counter: only blend kernels count, only once armed, and the
hook keeps calling whatever hook was installed before it (vLLM's JIT monitor)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from blend import jit_watch


def test_counts_blend_kernels_after_arm_and_chains(monkeypatch):
    knobs = pytest.importorskip("triton.knobs")
    calls = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jit_watch, "_state", {"installed": False, "armed": False, "compiles": 0})
    assert jit_watch.install()
    hook = knobs.runtime.jit_post_compile_hook
    ours = SimpleNamespace(module="blend.triton_kernels.attention", name="_selected_attention")
    theirs = SimpleNamespace(module="vllm.model_executor.layers", name="_some_kernel")
    hook(fn=ours, repr="warm-up")
    assert jit_watch.compiles() == 0  # not armed yet: the warm-up's own compiles
    jit_watch.arm()
    hook(fn=ours, repr="_selected_attention[SPLIT=True]")
    hook(fn=theirs, repr="vllm's")
    assert jit_watch.compiles() == 1
    assert len(calls) == 3  # the previous hook saw every compile
