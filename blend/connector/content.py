"""Chunks of prompts that carry no spans and no separator: found by their content.

A RAG app behind an OpenAI client pastes its documents into a chat message;
nothing in the request says where they are. The scheduler then
- finds every stored chunk inside the prompt by its token ids (`blend.matcher`),
  whole or in part, wherever it sits;
- treats the prompt's other paragraphs (`blend.segments.ParagraphSplitter`) as
  new chunks, which the miss path saves (on their second sight, by default).

The index learns a chunk's token ids when the scheduler plans its save (or a
precompute request computes it), and keeps them beside the store as
`<store dir>/index/<key[:2]>/<key>.ids`, so another engine on the same store,
or this one after a restart, finds them too (`refresh`, every `RESCAN_S`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blend.keys import chunk_key
from blend.log import get_logger
from blend.matcher import ChunkIndex, dump_ids, load_ids
from blend.segments import ParagraphSplitter

log = get_logger("Connector")

SUFFIX = ".ids"
RESCAN_S = 30.0


@dataclass(frozen=True)
class ContentChunk:
    """Prompt tokens `[start, end)`: rows `[src_start, src_start + end - start)` of the
    chunk `key` (`src_len` tokens long) when `found`, else a new paragraph chunk."""

    start: int
    end: int
    key: str
    src_start: int
    src_len: int
    found: bool


class ContentChunks:
    def __init__(self, tokenizer: Any, fingerprint: str, index_dir: Path | None,
                 min_tokens: int = 64) -> None:
        self.fingerprint = fingerprint
        self.index = ChunkIndex(window=32, min_match=min_tokens)
        self.splitter = ParagraphSplitter(tokenizer, min_tokens)
        self.dir = index_dir
        self._lengths: dict[str, int] = {}
        self._next_scan = 0.0
        self.refresh()

    # ---------------------------------------------------------------- the index
    def register(self, key: str, token_ids: Any) -> None:
        """A chunk about to be stored: findable from now on, and after a restart."""
        if key in self._lengths:
            return
        self._lengths[key] = len(token_ids)
        self.index.add(key, token_ids)
        if self.dir is not None:
            try:
                sub = self.dir / key[:2]
                sub.mkdir(parents=True, exist_ok=True)
                dump_ids(sub / f"{key}{SUFFIX}", token_ids)
            except OSError as exc:  # the index file is a convenience, never a failure
                log.warning("chunk %s: token ids not written (%r)", key[:12], exc)

    def forget(self, key: str) -> None:
        """A chunk the store no longer has (evicted): stop finding it, here and elsewhere."""
        if self._lengths.pop(key, None) is None:
            return
        self.index.remove(key)
        if self.dir is not None:
            try:
                os.unlink(self.dir / key[:2] / f"{key}{SUFFIX}")
            except OSError:
                pass

    def refresh(self, force: bool = False) -> int:
        """Index chunks other processes stored since the last scan; returns how many."""
        now = time.monotonic()
        if self.dir is None or (now < self._next_scan and not force):
            return 0
        self._next_scan = now + RESCAN_S
        added = 0
        try:
            subs = [e.path for e in os.scandir(self.dir) if e.is_dir()]
        except OSError:
            return 0
        for sub in subs:
            for e in os.scandir(sub):
                key = e.name[: -len(SUFFIX)]
                if not e.name.endswith(SUFFIX) or len(key) != 64 or key in self._lengths:
                    continue
                try:
                    ids = load_ids(e.path)
                except (OSError, ValueError):
                    continue
                self._lengths[key] = len(ids)
                self.index.add(key, ids)
                added += 1
        self.index.flush()  # sorted in now, not inside the next request's find
        return added

    # ---------------------------------------------------------------- one prompt
    def chunks(self, prompt: Any) -> list[ContentChunk]:
        """Stored chunks found in `prompt`, and its other paragraphs as new chunks, in order."""
        self.refresh()
        found = [ContentChunk(m.start, m.end, m.key, m.src_start, self._lengths[m.key], True)
                 for m in self.index.find(prompt) if m.key in self._lengths]
        out = list(found)
        taken = [(c.start, c.end) for c in found]
        for s, e in self.splitter.spans(prompt):
            if any(s < b and a < e for a, b in taken):
                continue  # overlaps a stored chunk: its other tokens are recomputed as text
            out.append(ContentChunk(s, e, chunk_key(self.fingerprint, prompt[s:e]), 0, e - s,
                                    False))
        out.sort(key=lambda c: c.start)
        return out
