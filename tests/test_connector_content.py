"""Chunks of unmarked (chat) prompts: paragraphs stored on first sight, then found by content
wherever they sit, whole or in part, also by another process through the index files."""

from __future__ import annotations

import pytest

from blend.connector.content import ContentChunks
from blend.keys import chunk_key

FP = "ab" * 32  # a model fingerprint is a hex digest


@pytest.fixture(scope="module")
def docs() -> list[str]:
    from pydoc_data.topics import topics

    return [" ".join(topics[k].split()[:120]) for k in ("assert", "break", "del", "global")]


def _chat(tok, system: str, docs: list[str], question: str) -> list[int]:
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": "\n\n".join(docs) + "\n\n" + question}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_first_sight_paragraphs_then_found_reordered(tok, docs, tmp_path):
    cc = ContentChunks(tok, FP, tmp_path / "index")
    p1 = _chat(tok, "Answer from the documents.", docs[:3], "Which one is about del?")
    first = cc.chunks(p1)
    assert [c.found for c in first] == [False] * 3  # nothing stored yet: three new paragraphs
    for c in first:  # what the scheduler does when it plans their saves
        assert c.key == chunk_key(FP, p1[c.start:c.end])
        cc.register(c.key, p1[c.start:c.end])
    p2 = _chat(tok, "Be brief.", [docs[2], docs[3], docs[0]], "And the last one?")
    got = cc.chunks(p2)
    found = [c for c in got if c.found]
    assert {c.key for c in found} == {first[0].key, first[2].key}
    for c in found:  # the prompt's tokens are the stored chunk's rows, exactly
        stored = next(x for x in first if x.key == c.key)
        assert p2[c.start:c.end] == p1[stored.start + c.src_start:
                                       stored.start + c.src_start + c.end - c.start]
        assert c.src_len == stored.end - stored.start
    new = [c for c in got if not c.found]
    assert len(new) == 1 and docs[3][:40] in tok.decode(p2[new[0].start:new[0].end])
    # Another process on the same store finds them through the index files.
    other = ContentChunks(tok, FP, tmp_path / "index")
    assert {c.key for c in other.chunks(p2) if c.found} == {c.key for c in found}


def test_changed_token_is_not_a_hit_and_forget(tok, docs, tmp_path):
    cc = ContentChunks(tok, FP, None)
    p1 = _chat(tok, "S.", docs[:1], "Q?")
    (c,) = cc.chunks(p1)
    cc.register(c.key, p1[c.start:c.end])
    p2 = list(p1)
    mid = (c.start + c.end) // 2
    p2[mid] = (p2[mid] + 1) % 1000 + 1  # one token changed in the middle of the document
    for m in cc.chunks(p2):
        if m.found:
            assert not (m.start <= mid < m.end)  # never claimed across the change
    cc.forget(c.key)
    assert not any(m.found for m in cc.chunks(p1))


def test_no_stored_chunk_and_short_text(tok, tmp_path):
    cc = ContentChunks(tok, FP, tmp_path / "index")
    assert cc.chunks(_chat(tok, "Hi.", ["A short line."], "Why?")) == []


def test_forget_removes_the_index_file(tok, docs, tmp_path):
    cc = ContentChunks(tok, FP, tmp_path / "index")
    p = _chat(tok, "S.", docs[:1], "Q?")
    (c,) = cc.chunks(p)
    cc.register(c.key, p[c.start:c.end])
    assert len(list((tmp_path / "index").rglob("*.ids"))) == 1
    cc.forget(c.key)  # evicted from the store: another process must not find it either
    assert not list((tmp_path / "index").rglob("*.ids"))
    assert not any(m.found for m in ContentChunks(tok, FP, tmp_path / "index").chunks(p))
