"""The user-facing helpers: `kv_transfer_config`, `build_prompt`, `precompute`.

A prompt built by `build_prompt` is a `BlendPrompt`: a vLLM `TokensPrompt`
dict that also knows its chunk spans. vLLM 0.32 has no prompt field for
per-request connector data; the one channel that reaches the connector's
scheduler side is `SamplingParams.extra_args["kv_transfer_params"]` (it
becomes `Request.kv_transfer_params`). The `prompt spans` patch moves a
BlendPrompt's spans into a copy of its SamplingParams inside
`LLM.generate`, so `llm.generate(prompt, SamplingParams(...))` just works.
Without the patch, pass `prompt.sampling_params(sp)` yourself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from blend.segments import ON_MISS, Span, make_params, validate_spans

CONNECTOR = "BlendConnector"
CONNECTOR_MODULE = "blend.connector"

def kv_transfer_config(
    store: str | dict | None = "local",
    cache_fuse_metadata: dict[str, Any] | None = None,
    **extra: Any,
):
    """A `vllm.config.KVTransferConfig` that turns on CacheBlend (validated now, not at startup)."""
    from vllm.config import KVTransferConfig

    from blend.connector.extra_config import check_extra_config

    cfg = {"store": store, "cache_fuse_metadata": dict(cache_fuse_metadata or {}), **extra}
    cfg = check_extra_config(cfg)
    return KVTransferConfig(
        kv_connector=CONNECTOR,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_connector_extra_config=cfg,
    )


class BlendPrompt(dict):
    """A vLLM `TokensPrompt` (`{"prompt_token_ids": [...]}`) plus its chunk spans.

    `spans` are `[start, end)` token ranges of the chunks; everything before
    the first chunk is the prefix, everything after the last is the question.
    """

    def __init__(self, token_ids: Sequence[int], spans: Sequence[Span], text: str | None = None,
                 on_miss: str | None = None, cache_fuse_metadata: dict | None = None) -> None:
        ids = [int(t) for t in token_ids]
        super().__init__(prompt_token_ids=ids)
        self.spans = validate_spans([list(s) for s in spans], len(ids))
        self.text = text
        self.on_miss = on_miss
        self.cache_fuse_metadata = cache_fuse_metadata
        if cache_fuse_metadata:
            from blend.config import BlendConfig

            BlendConfig.from_dict(cache_fuse_metadata)  # raise here, not in the engine

    @property
    def prompt_token_ids(self) -> list[int]:
        return self["prompt_token_ids"]

    def tokens_prompt(self) -> dict:
        """The plain `TokensPrompt` vLLM renders (a fresh dict, no extra keys)."""
        return {"prompt_token_ids": list(self["prompt_token_ids"])}

    @property
    def cache_salt(self) -> str:
        """vLLM prefix-cache salt for the blended request.

        vLLM's prefix cache keeps the blocks a blend wrote, and they hold fused
        (approximate) KV. Salting keeps them from being served to a plain request
        with the same tokens, or to a blend under other `cache_fuse_metadata`;
        blends of the same prompt and config still share them.
        """
        meta = json.dumps(self.cache_fuse_metadata or {}, sort_keys=True)
        return "cacheblend:" + hashlib.sha256(meta.encode()).hexdigest()[:16]

    def engine_prompt(self) -> dict:
        """The `TokensPrompt` vLLM renders for the blended request (salted, see `cache_salt`)."""
        return {**self.tokens_prompt(), "cache_salt": self.cache_salt}

    def kv_transfer_params(self) -> dict:
        return make_params(self.spans, self.on_miss, self.cache_fuse_metadata)

    def attach(self, sampling_params):
        """A copy of `sampling_params` carrying this prompt's spans to the connector."""
        sp = sampling_params.clone()
        extra = dict(sp.extra_args or {})
        ktp = dict(extra.get("kv_transfer_params") or {})
        ktp.update(self.kv_transfer_params())
        extra["kv_transfer_params"] = ktp
        sp.extra_args = extra
        return sp

    def sampling_params(self, sampling_params=None):
        """`attach` for callers without the prompt-spans patch (e.g. AsyncLLM, raw engine)."""
        if sampling_params is None:
            from vllm import SamplingParams

            sampling_params = SamplingParams()
        return self.attach(sampling_params)

    def __repr__(self) -> str:
        return f"BlendPrompt({len(self['prompt_token_ids'])} tokens, spans={self.spans})"


def build_prompt(
    tokenizer: Any,
    system: str,
    chunks: Sequence[str],
    question: str,
    *,
    chat: bool = True,
    on_miss: str | None = None,
    cache_fuse_metadata: dict | None = None,
) -> BlendPrompt:
    """Prompt `system | chunk_1 | ... | chunk_k | question` with exact chunk spans.

    The layout is `blend.prompt.build_layout`'s, the one the offline
    `HFBlender` uses: each chunk is tokenized on its own, so its token ids
    (and its cache key) are the same wherever it appears; with a chat
    template the chunks and the question form the user turn.
    `cache_fuse_metadata` overrides the engine's blend knobs for this request
    only (e.g. `{"recomp_ratio": 1.0}`).
    """
    from blend.prompt import build_layout

    if not isinstance(chunks, (list, tuple)) or not chunks:
        raise ValueError("chunks: expected a non-empty list of strings")
    for i, c in enumerate(chunks):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"chunks[{i}]: expected non-empty text, got {c!r}")
    if not isinstance(system, str) or not isinstance(question, str):
        raise ValueError("system and question: expected strings")
    if on_miss is not None and on_miss not in ON_MISS:
        raise ValueError(f"on_miss: {on_miss!r} not allowed; allowed: {list(ON_MISS)}")
    layout = build_layout(tokenizer, system, list(chunks), question, chat=chat)
    ids = layout.token_ids
    return BlendPrompt(ids, layout.spans, text=tokenizer.decode(ids), on_miss=on_miss,
                       cache_fuse_metadata=cache_fuse_metadata)


def chunk_prompt(tokenizer: Any, chunk: str, chat: bool = True) -> BlendPrompt:
    """A request that only computes (and stores) one chunk's standalone KV.

    The chunk's tokens are exactly those `build_prompt` gives it, at position
    0, and one trailing token follows: the connector never provides a
    prompt's last token, and the chunk must be provided whole to be stored.
    """
    from blend.prompt import build_layout

    cids = build_layout(tokenizer, "", [chunk], "", chat=chat).chunks[0]
    if not cids:
        raise ValueError(f"chunk {chunk!r} has no tokens")
    tail = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cids[-1]
    return BlendPrompt(cids + [int(tail)], [(0, len(cids))], on_miss="compute")


def precompute(llm: Any, chunks: Sequence[str], chat: bool = True) -> dict[str, int]:
    """Compute and store every chunk's standalone KV through the engine.

    Sends one chunk-only request per chunk (one output token); the connector
    computes the chunks that miss and stores them. Returns counts.
    """
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [chunk_prompt(tok, c, chat) for c in chunks]
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([p.tokens_prompt() for p in prompts], [p.attach(sp) for p in prompts],
                 use_tqdm=False)
    return {"chunks": len(prompts), "tokens": sum(p.spans[0][1] for p in prompts)}
