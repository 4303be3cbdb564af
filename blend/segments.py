"""Cut a prompt into prefix, chunks and suffix, from explicit spans or a separator.

Explicit spans are the exact way: `build_prompt` tokenizes every chunk on its
own and passes each chunk's `[start, end)` token span with the request.
Separator mode is for plain-text clients. It matches the separator on the
prompt's *bytes*, not on token ids: BPE may merge the separator with its
neighbours ("\\n\\n" + "The" -> "\\n\\nThe"), so a token-id search misses it
(a known LMCache failure). A token that straddles a separator boundary
belongs to no chunk; it is glue text and is always recomputed.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np

Span = tuple[int, int]

# Key inside a request's `kv_transfer_params` that carries our per-request data.
PARAMS_KEY = "blend"
ON_MISS = ("recompute", "compute", "prefill")


class SpanError(ValueError):
    """Chunk spans that cannot describe this prompt."""


@dataclass(frozen=True)
class Segment:
    """`[start, end)` of the prompt; `chunk` segments are cached, `text` ones recomputed."""

    start: int
    end: int
    kind: str  # "chunk" | "text"

    @property
    def length(self) -> int:
        return self.end - self.start


def validate_spans(spans: Any, prompt_len: int) -> list[Span]:
    """Check spans against a prompt of `prompt_len` tokens; raise `SpanError` saying why."""
    if not isinstance(spans, (list, tuple)):
        raise SpanError(f"spans must be a list of [start, end) pairs, got {type(spans).__name__}")
    out: list[Span] = []
    for i, sp in enumerate(spans):
        if (
            not isinstance(sp, (list, tuple))
            or len(sp) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in sp)
        ):
            raise SpanError(f"span {i}: expected [start, end) integers, got {sp!r}")
        s, e = int(sp[0]), int(sp[1])
        if s >= e:
            raise SpanError(f"span {i}: [{s}, {e}) is empty")
        if s < 0 or e > prompt_len:
            raise SpanError(f"span {i}: [{s}, {e}) is outside the prompt [0, {prompt_len})")
        if out and s < out[-1][1]:
            raise SpanError(
                f"span {i}: [{s}, {e}) overlaps or precedes span {i - 1} {list(out[-1])}; "
                "spans must be sorted and disjoint"
            )
        out.append((s, e))
    return out


def segment(prompt_len: int, spans: Sequence[Span]) -> list[Segment]:
    """Segments covering `[0, context_end)`: text before/between chunks, and the chunks.

    The suffix (question) after the last chunk is not returned: vLLM computes it.
    """
    segs: list[Segment] = []
    pos = 0
    for s, e in spans:
        if s > pos:
            segs.append(Segment(pos, s, "text"))
        segs.append(Segment(s, e, "chunk"))
        pos = e
    return segs


def context_end(prompt_len: int, spans: Sequence[Span]) -> int:
    """Tokens the connector provides: up to the last chunk's end, never the last prompt token."""
    if not spans:
        return 0
    return min(spans[-1][1], prompt_len - 1)


def request_params(kv_transfer_params: Any) -> dict | None:
    """Our part of a request's `kv_transfer_params`, or None."""
    if not isinstance(kv_transfer_params, dict):
        return None
    p = kv_transfer_params.get(PARAMS_KEY)
    return p if isinstance(p, dict) else None


def make_params(spans: Sequence[Span], on_miss: str | None = None,
                cache_fuse_metadata: dict | None = None) -> dict:
    """The `kv_transfer_params` value that carries chunk spans (and overrides) with a request."""
    p: dict[str, Any] = {"spans": [[int(s), int(e)] for s, e in spans]}
    if cache_fuse_metadata:
        p["cache_fuse_metadata"] = dict(cache_fuse_metadata)
    if on_miss is not None:
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss: expected one of {ON_MISS}, got {on_miss!r}")
        p["on_miss"] = on_miss
    return {PARAMS_KEY: p}


# ---------------------------------------------------------------- separator mode


def _bytes_to_unicode() -> dict[int, str]:
    """The byte <-> printable-char table of byte-level BPE (GPT-2 and descendants)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _piece_bytes(piece: str, special: set[str]) -> bytes:
    if piece in special:
        return piece.encode("utf-8")
    if all(ch in _BYTE_DECODER for ch in piece):  # byte-level BPE
        return bytes(_BYTE_DECODER[ch] for ch in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece word piece


def _special_pieces(tokenizer: Any) -> set[str]:
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    return special | set((getattr(tokenizer, "get_added_vocab", lambda: {})() or {}).keys())


def token_byte_spans(tokenizer: Any, token_ids: Sequence[int]) -> tuple[bytes, list[Span]]:
    """The prompt's bytes and each token's `[start, end)` byte range in them."""
    pieces = tokenizer.convert_ids_to_tokens(list(token_ids))
    special = _special_pieces(tokenizer)
    data, starts, ends = _join([_piece_bytes(p or "", special) for p in pieces])
    return data, list(zip(starts, ends))


def _join(parts: list[bytes]) -> tuple[bytes, list[int], list[int]]:
    """The bytes, and each part's start and end offset in them."""
    ends = list(accumulate(map(len, parts)))
    return b"".join(parts), [0, *ends[:-1]], ends


class TokenBytes:
    """Each vocabulary id's bytes, decoded once: a prompt's bytes are then one lookup per
    token (the scheduler splits every request's prompt; per-token tokenizer calls add
    up to milliseconds on a long prompt)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._special = _special_pieces(tokenizer)
        self._table: dict[int, bytes] = {}

    def offsets(self, token_ids: Sequence[int]) -> tuple[bytes, list[int], list[int]]:
        """The prompt's bytes, and each token's start and end offset in them."""
        table = self._table
        missing = [t for t in set(token_ids) if t not in table]
        if missing:
            pieces = self.tokenizer.convert_ids_to_tokens(missing)
            for t, p in zip(missing, pieces):
                table[t] = _piece_bytes(p or "", self._special)
        return _join([table[t] for t in token_ids])


class SeparatorSplitter:
    """Chunk spans from a separator string found in the prompt's bytes.

    Text before the first separator is the prefix (system prompt), text after
    the last is the suffix (question), and each piece between two separators
    is one chunk. A chunk's span holds only the tokens that lie wholly inside
    its piece, so a token merged across the separator is recomputed, never
    cached under a wrong key.
    """

    def __init__(self, tokenizer: Any, separator: str) -> None:
        if not isinstance(separator, str) or not separator:
            raise ValueError("separator: expected a non-empty string")
        self.tokenizer = tokenizer
        self.separator = separator
        self._sep = separator.encode("utf-8")
        self._bytes = TokenBytes(tokenizer)

    def spans(self, token_ids: Sequence[int]) -> list[Span]:
        text, starts, ends = self._bytes.offsets(token_ids)
        cuts: list[int] = []
        i = text.find(self._sep)
        while i >= 0:
            cuts.append(i)
            i = text.find(self._sep, i + len(self._sep))
        out: list[Span] = []
        for a, b in zip(cuts, cuts[1:]):
            lo, hi = a + len(self._sep), b  # the piece's bytes
            s = bisect_left(starts, lo)  # the first token wholly after the separator
            e = max(s, bisect_right(ends, hi))  # tokens ending inside the piece
            if e > s and text[starts[s]:ends[e - 1]].strip():
                out.append((s, e))
        return out


# ---------------------------------------------------------------- unmarked prompts

_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


class ParagraphSplitter:
    """The chunks of a prompt nothing marks (a chat message with pasted documents): its
    paragraphs, i.e. the text between blank lines and between special tokens (a chat
    template's message markers, with the role line that follows one), of at least
    `min_tokens` tokens.

    Cut on bytes like the separator, so BPE merging across a blank line cannot hide it,
    and a token straddling a cut belongs to no paragraph. What this chooses is only what a
    first sight stores; later prompts find stored chunks by content (`blend.matcher`)
    wherever they sit, in whole or in part.
    """

    def __init__(self, tokenizer: Any, min_tokens: int) -> None:
        self.min_tokens = int(min_tokens)
        self._bytes = TokenBytes(tokenizer)
        specials = [tokenizer.convert_tokens_to_ids(p) for p in self._bytes._special]
        self._special_ids = np.array(sorted({int(i) for i in specials if i is not None}),
                                     dtype=np.int64)

    def spans(self, token_ids: Sequence[int]) -> list[Span]:
        text, starts, ends = self._bytes.offsets(token_ids)
        cuts = [(m.start(), m.end()) for m in _BLANK_LINE.finditer(text)]
        special = np.flatnonzero(np.isin(np.asarray(token_ids, dtype=np.int64), self._special_ids))
        for i in special.tolist():  # a message marker and its header line ("user\n")
            nl = text.find(b"\n", ends[i], ends[i] + 32)
            cuts.append((starts[i], ends[i] if nl < 0 else nl + 1))
        cuts.sort()
        out: list[Span] = []
        lo = 0
        for a, b in [*cuts, (len(text), len(text))]:
            if a > lo:
                s = bisect_left(starts, lo)
                e = max(s, bisect_right(ends, a))
                if e - s >= self.min_tokens and text[starts[s]:ends[e - 1]].strip():
                    out.append((s, e))
            lo = max(lo, b)
        return out
