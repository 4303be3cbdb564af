"""Prompt layout: prefix (system), chunks, suffix (question), tokenized piece by piece.

Each chunk is tokenized on its own, so its token ids, and therefore its key and
cached KV, are identical wherever it appears. The chat template supplies the
prefix and suffix around the user turn when the tokenizer has one.
"""

from __future__ import annotations

from dataclasses import dataclass

_SLOT = "\u0000CACHEBLEND_USER_TURN\u0000"


@dataclass(frozen=True)
class PromptLayout:
    prefix: list[int]
    chunks: list[list[int]]
    suffix: list[int]

    @property
    def token_ids(self) -> list[int]:
        out = list(self.prefix)
        for c in self.chunks:
            out += c
        return out + list(self.suffix)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """`[start, end)` token span of each chunk in the prompt."""
        spans, at = [], len(self.prefix)
        for c in self.chunks:
            spans.append((at, at + len(c)))
            at += len(c)
        return spans

    @property
    def context_len(self) -> int:
        """Tokens before the question: what blending covers."""
        return len(self.prefix) + sum(len(c) for c in self.chunks)


def build_layout(tokenizer, system: str, chunks: list[str], question: str,
                 chat: bool = True) -> PromptLayout:
    """Tokenize prefix, each chunk and suffix separately (no special tokens added per piece)."""
    if chat and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": _SLOT}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(_SLOT)
    else:
        bos = tokenizer.bos_token or ""
        head, tail = f"{bos}{system}\n\n", "\n"
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    return PromptLayout(
        prefix=enc(head),
        chunks=[enc(f"{c.strip()}\n\n") for c in chunks],
        suffix=enc(f"Question: {question.strip()}{tail}"),
    )
