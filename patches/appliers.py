"""What each kind of patch point does to its vLLM object. One function per kind."""

from __future__ import annotations

import functools
from typing import Any

from . import model_capture

CONNECTOR_NAME = "BlendConnector"
CONNECTOR_MODULE = "blend.connector"
_SPANS_FLAG = "__blend_prompt_spans__"


def _resolve(module: Any, target: str) -> tuple[Any, str]:
    """('Class.method') -> (Class, 'method'); ('Class') -> (module, 'Class')."""
    parts = target.split(".")
    obj = module
    for p in parts[:-1]:
        obj = getattr(obj, p)
    if not hasattr(obj, parts[-1]):
        raise AttributeError(f"{module.__name__}.{target} not found")
    return obj, parts[-1]


def apply_register(module: Any, target: str) -> str:
    """Register `BlendConnector` with vLLM's connector factory (lazy import by name)."""
    owner, attr = _resolve(module, target)
    factory = getattr(owner, attr)
    if CONNECTOR_NAME not in factory._registry:
        factory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    return CONNECTOR_NAME


def apply_capture(module: Any, target: str) -> str:
    """Wrap a model runner's `load_model` so the loaded model is recorded."""
    owner, attr = _resolve(module, target)
    model_capture.wrap_load_model(owner, attr)
    v2 = ".worker.gpu." in module.__name__ + "." or ".worker.cpu." in module.__name__ + "."
    return owner.__name__ + (" V2" if v2 else "")


def apply_prompt_spans(module: Any, target: str) -> str:
    """Let `LLM.generate` take a `BlendPrompt`: its spans go into that request's params.

    vLLM's prompt dicts have no field for per-request connector data, while
    `SamplingParams.extra_args["kv_transfer_params"]` reaches the connector's
    scheduler side as `Request.kv_transfer_params`. We pair each BlendPrompt
    with a copy of its SamplingParams that carries the spans, before vLLM
    renders the prompts.
    """
    owner, attr = _resolve(module, target)
    orig = getattr(owner, attr)
    if getattr(orig, _SPANS_FLAG, False):
        return owner.__name__

    @functools.wraps(orig)
    def _add_completion_requests(self, prompts, params, *args, **kwargs):
        from blend.api import BlendPrompt  # lazy: blend.api imports vLLM

        seq = [prompts] if isinstance(prompts, (dict, str, bytes)) else prompts
        if isinstance(seq, (list, tuple)) and any(isinstance(p, BlendPrompt) for p in seq):
            seq_params = self._params_to_seq(params, len(seq))
            new_prompts, new_params = [], []
            for p, sp in zip(seq, seq_params):
                if isinstance(p, BlendPrompt):
                    new_prompts.append(p.engine_prompt())
                    new_params.append(p.attach(sp))
                else:
                    new_prompts.append(p)
                    new_params.append(sp)
            prompts, params = new_prompts, new_params
        return orig(self, prompts, params, *args, **kwargs)

    setattr(_add_completion_requests, _SPANS_FLAG, True)
    setattr(owner, attr, _add_completion_requests)
    return owner.__name__


APPLIERS = {
    "register": apply_register,
    "capture": apply_capture,
    "prompt_spans": apply_prompt_spans,
}
