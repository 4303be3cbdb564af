"""The content matcher (blend/matcher.py): chunks found in a prompt by their token ids alone.

Engine-free: random ids, real SmolLM2 tokenization (BPE merges at a chunk's edges), and a
property test against a brute-force matcher in plain Python.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import blend.matcher as bm
from blend.matcher import ChunkIndex, Match, dump_ids, load_ids, window_hashes

VOCAB = 49152


def key(i: int) -> str:
    return f"{i:064x}"


def rand_ids(rng: np.random.Generator, n: int, vocab: int = VOCAB) -> np.ndarray:
    return rng.integers(0, vocab, n).astype(np.uint32)


def index_of(chunks: dict[str, np.ndarray], **kw) -> ChunkIndex:
    ix = ChunkIndex(**kw)
    for k, ids in chunks.items():
        ix.add(k, ids)
    return ix


def check_valid(matches: list[Match], prompt, chunks: dict, min_match: int) -> None:
    """What the connector relies on: exact, sorted, disjoint, long enough, placeable."""
    prompt = np.asarray(prompt)
    for m in matches:
        src = np.asarray(chunks[m.key])[m.src_start : m.src_start + m.length]
        assert len(src) == m.length and (prompt[m.start : m.end] == src).all(), m
        assert m.length >= min_match and m.start >= m.src_start >= 0, m
    for a, b in zip(matches, matches[1:]):
        assert a.end <= b.start, (a, b)


def ref_find(chunks: dict[str, list[int]], prompt: list[int], min_match: int) -> list[Match]:
    """Brute force: every maximal equal run on every diagonal >= 0, then longest first."""
    runs = []
    for k, c in chunks.items():
        if len(c) < min_match:
            continue
        for d in range(len(prompt)):  # chunk offset j sits at prompt position d + j
            j = 0
            while j < len(c) and d + j < len(prompt):
                j0 = j
                while j < len(c) and d + j < len(prompt) and c[j] == prompt[d + j]:
                    j += 1
                if j - j0 >= min_match:
                    runs.append((d + j0, d + j, k, j0))
                j += 1 if j == j0 else 0
    runs.sort(key=lambda r: (r[0] - r[1], r[0], r[2], r[3]))
    taken = [False] * len(prompt)
    out = []
    for s, e, k, s0 in runs:
        i = s
        while i < e:
            if taken[i]:
                i += 1
                continue
            j = i
            while j < e and not taken[j]:
                j += 1
            if j - i >= min_match:
                out.append(Match(i, j, k, s0 + i - s))
                taken[i:j] = [True] * (j - i)
            i = j
    return sorted(out, key=lambda m: m.start)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def five(rng) -> dict[str, np.ndarray]:
    return {key(i): rand_ids(rng, n) for i, n in enumerate([1000, 700, 300, 128, 64])}


# ---- hashing -----------------------------------------------------------------------------------
def test_window_hash_is_the_polynomial_and_position_free(rng):
    ids = rand_ids(rng, 300)
    w, b = 8, bm._BASE
    want = [sum(int(ids[i + j]) * pow(b, j, 1 << 64) for j in range(w)) % (1 << 64)
            for i in range(len(ids) - w + 1)]
    assert window_hashes(ids, w).tolist() == want
    shifted = np.concatenate([rand_ids(rng, 17), ids[100:140]])
    assert window_hashes(shifted, w)[17] == want[100]
    assert len(window_hashes(ids[:7], w)) == 0


# ---- chunks inside real prompts: any order, partial, between noise -------------------------
def test_chunks_found_in_any_order_between_noise(rng, five):
    ix = index_of(five)
    order = [3, 0, 4, 2, 1]
    parts, want, pos = [], [], 0
    for i in order:
        noise = rand_ids(rng, 5 + i)
        parts += [noise, five[key(i)]]
        pos += len(noise)
        want.append(Match(pos, pos + len(five[key(i)]), key(i), 0))
        pos += len(five[key(i)])
    prompt = np.concatenate(parts + [rand_ids(rng, 40)])
    assert ix.find(prompt) == want
    assert ix.find(prompt.tolist()) == want  # a list, as vLLM holds prompt ids
    assert ix.find(tuple(prompt.astype(np.int64).tolist())) == want


def test_chunk_twice_in_one_prompt(rng, five):
    c = five[key(1)]
    prompt = np.concatenate([rand_ids(rng, 10), c, rand_ids(rng, 3), c])
    assert index_of(five).find(prompt) == [
        Match(10, 710, key(1), 0), Match(713, 1413, key(1), 0)]
    # back to back: two matches, not one run past the chunk's end
    assert index_of(five).find(np.concatenate([c, c])) == [
        Match(0, 700, key(1), 0), Match(700, 1400, key(1), 0)]


def test_overlapping_candidates_keep_the_whole_chunk(rng):
    a = rand_ids(rng, 600)
    b = np.concatenate([a[200:400], rand_ids(rng, 300)])  # shares 200 tokens of a
    chunks = {key(1): a, key(2): b}
    prompt = np.concatenate([rand_ids(rng, 7), a, b[200:]])
    # b's own 200-token copy of a[200:400] loses to a; b's tail is still found
    assert index_of(chunks).find(prompt) == [
        Match(7, 607, key(1), 0), Match(607, 907, key(2), 200)]


def test_a_shorter_earlier_run_does_not_cut_a_whole_chunk(rng):
    """Why longest first, not left to right: b (100 other tokens + a's first 200) starts
    first, but a stays whole and b keeps only what a does not cover."""
    a, pre = rand_ids(rng, 1000), rand_ids(rng, 100)
    chunks = {key(1): a, key(2): np.concatenate([pre, a[:200]])}
    prompt = np.concatenate([pre, a])
    assert index_of(chunks).find(prompt) == [Match(0, 100, key(2), 0), Match(100, 1100, key(1), 0)]


def test_chunk_stored_as_overlapping_pieces(rng):
    t = rand_ids(rng, 1000)
    chunks = {key(1): t[:600], key(2): t[400:]}
    prompt = np.concatenate([rand_ids(rng, 5), t])
    assert index_of(chunks).find(prompt) == [
        Match(5, 605, key(1), 0), Match(605, 1005, key(2), 200)]


@pytest.mark.parametrize(("at", "want"), [
    (150, [(0, 150, 0), (151, 300, 151)]),  # both sides long enough: two pieces
    (40, [(41, 300, 41)]),  # 40 tokens on the left < min_match
    (270, [(0, 270, 0)]),
])
def test_one_changed_token_is_never_matched(rng, at, want):
    c = rand_ids(rng, 300)
    p = c.copy()
    p[at] = (p[at] + 1) % VOCAB
    noise = 9
    prompt = np.concatenate([rand_ids(rng, noise), p])
    got = index_of({key(0): c}).find(prompt)
    assert got == [Match(s + noise, e + noise, key(0), s0) for s, e, s0 in want]
    assert all(not (m.start <= noise + at < m.end) for m in got)


def test_a_short_chunk_with_a_changed_token_is_no_hit(rng):
    c = rand_ids(rng, 100)
    p = c.copy()
    p[50] += 1
    assert index_of({key(0): c}).find(np.concatenate([rand_ids(rng, 3), p])) == []


def test_no_stored_chunk(rng, five, monkeypatch):
    assert index_of(five).find(rand_ids(rng, 5000)) == []
    assert index_of(five).find(five[key(0)][:63]) == []  # shorter than min_match
    # an empty index returns before hashing the prompt at all

    def no_hash(*a, **k):
        raise AssertionError("hashed")

    monkeypatch.setattr(bm, "window_hashes", no_hash)
    assert ChunkIndex().find(rand_ids(rng, 32768)) == []


def test_bpe_edges_random_ids(rng):
    """A merged first/last token: the interior matches, the changed edge tokens are not claimed."""
    c = rand_ids(rng, 200)
    p = c.copy()
    p[0], p[-1] = c[0] + 1, c[-1] + 1
    prompt = np.concatenate([rand_ids(rng, 20), p, rand_ids(rng, 20)])
    assert index_of({key(0): c}).find(prompt) == [Match(21, 219, key(0), 1)]


def test_a_chunk_cannot_move_before_position_zero(rng):
    c = rand_ids(rng, 400)
    ix = index_of({key(0): c})
    assert ix.find(c[100:]) == []  # chunk token 100 at position 0: start - src_start < 0
    assert ix.find(np.concatenate([rand_ids(rng, 50), c[100:]])) == []
    got = ix.find(np.concatenate([rand_ids(rng, 100), c[100:]]))
    assert got == [Match(100, 400, key(0), 100)]


def test_forced_hash_collisions_are_rejected(rng, five, monkeypatch):
    """Every window collides (a hash of 3 values): verification alone decides, same result."""
    parts = [rand_ids(rng, 11), five[key(2)], five[key(0)][5:300], rand_ids(rng, 30)]
    prompt = np.concatenate(parts)
    good = index_of(five).find(prompt)
    assert good == [Match(11, 311, key(2), 0), Match(311, 606, key(0), 5)]

    def bad(ids, window, scratch=None):
        n = max(len(ids) - window + 1, 0)
        return (np.lib.stride_tricks.sliding_window_view(ids, window)[:n, 0] % 3).astype(np.uint64)

    monkeypatch.setattr(bm, "window_hashes", bad)
    ix = index_of(five, max_dups=10**9)
    assert ix.find(prompt) == good
    monkeypatch.setattr(bm, "window_hashes", lambda ids, w, s=None: np.zeros(max(len(ids) - w + 1, 0), np.uint64))
    assert index_of(five, max_dups=10**9).find(prompt) == good


def test_boilerplate_windows_are_not_anchors_but_runs_cross_them(rng):
    header = rand_ids(rng, 100)
    chunks = {key(i): np.concatenate([header, rand_ids(rng, 200)]) for i in range(20)}
    ix = index_of(chunks)  # max_dups=16 < 20 copies of the header's windows
    prompt = np.concatenate([rand_ids(rng, 4), chunks[key(7)], rand_ids(rng, 4)])
    assert ix.find(prompt) == [Match(4, 304, key(7), 0)]
    # the header alone is made only of boilerplate windows: not found (a documented limit)
    assert ix.find(np.concatenate([rand_ids(rng, 4), header])) == []


@pytest.mark.parametrize("run", [70, 600])
def test_periodic_text_costs_no_more_than_plain_text(rng, monkeypatch, run):
    """A long stretch of one token in the prompt against a chunk holding a shorter one would
    match on every shift (thousands of runs, seconds). Its windows are ambiguous: either
    stored > max_dups times (600 tokens: 18 anchors) or found at > max_dups prompt positions
    (70 tokens: one anchor), so they are no anchors; the chunk is still found whole."""
    c = np.concatenate([rand_ids(rng, 200), np.full(run, 7), rand_ids(rng, 200)]).astype(np.uint32)
    prompt = np.concatenate([rand_ids(rng, 5), c, np.full(20000, 7, np.uint32)])
    hits = []
    runs = ChunkIndex._runs
    monkeypatch.setattr(ChunkIndex, "_runs", lambda self, p, pos, *a: hits.append(len(pos)) or runs(self, p, pos, *a))
    assert index_of({key(0): c}).find(prompt) == [Match(5, 5 + len(c), key(0), 0)]
    assert hits and max(hits) < 20


def test_a_chunk_pasted_more_than_max_dups_times_is_not_found(rng):
    c = rand_ids(rng, 100)
    ix = index_of({key(0): c}, max_dups=4)
    assert len(ix.find(np.concatenate([c] * 4))) == 4
    assert ix.find(np.concatenate([c] * 5)) == []


# ---- the index's life cycle ----------------------------------------------------------------------
def test_add_remove_contains(rng, five):
    ix = index_of(five)
    assert len(ix) == 5 and key(4) in ix
    ix.add(key(9), rand_ids(rng, 63))  # shorter than min_match: not indexed
    assert key(9) not in ix and len(ix) == 5
    ix.add(key(0), rand_ids(rng, 500))  # known key: no-op (keys are content hashes)
    prompt = np.concatenate([rand_ids(rng, 3), five[key(0)]])
    assert ix.find(prompt) == [Match(3, 1003, key(0), 0)]
    ix.remove(key(0))
    ix.remove(key(0))
    assert key(0) not in ix and ix.find(prompt) == []
    ix.add(key(0), five[key(0)])
    assert ix.find(prompt) == [Match(3, 1003, key(0), 0)]


def test_levels_and_compaction(rng):
    """Enough anchors to merge the small level into the main one, then enough removals to
    re-index: every live chunk is still found, no removed one is."""
    chunks = {key(i): rand_ids(rng, 300) for i in range(300)}
    ix = ChunkIndex(window=8, min_match=16)  # 37 anchors a chunk: 11k > 2048 (_MIN_SMALL)
    for i, (k, ids) in enumerate(chunks.items()):
        ix.add(k, ids)
        if i % 50 == 0:
            ix.flush()
    assert len(ix._main) > 0
    prompt = np.concatenate([chunks[key(i)] for i in (0, 150, 299)])
    assert [m.key for m in ix.find(prompt)] == [key(0), key(150), key(299)]
    for i in range(1, 290):
        ix.remove(key(i))
    assert ix._nflat < 300 * 300  # compacted
    assert [m.key for m in ix.find(prompt)] == [key(0), key(299)]
    assert len(ix) == 11


def test_concurrent_add_remove_and_find(rng):
    """The saver thread adds every chunk, then removes most (a compaction), while the
    scheduler finds: every answer is valid; the last one holds exactly the live chunks."""
    chunks = {key(i): rand_ids(rng, 256) for i in range(300)}
    sample = list(range(0, 300, 15))
    prompt = np.concatenate([chunks[key(i)] for i in sample])
    ix = ChunkIndex()
    errors: list[BaseException] = []

    def saver():
        try:
            for k, ids in chunks.items():
                ix.add(k, ids)
            for i in range(280):  # 71,680 dead ids > 65,536: re-indexed
                ix.remove(key(i))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=saver)
    t.start()
    seen = 0
    while t.is_alive() or seen == 0:
        got = ix.find(prompt)
        check_valid(got, prompt, chunks, 64)
        seen += 1
    t.join()
    assert not errors
    assert ix._nflat < 300 * 256  # the compaction ran
    assert [m.key for m in ix.find(prompt)] == [key(i) for i in sample if i >= 280]


def test_ids_files_and_from_dir(tmp_path, rng, five):
    for k, ids in five.items():
        d = tmp_path / k[:2]
        d.mkdir(exist_ok=True)
        dump_ids(d / f"{k}.ids", ids)
        (d / f"{k}.kv").write_bytes(b"kv")
    assert (load_ids(tmp_path / key(1)[:2] / f"{key(1)}.ids") == five[key(1)]).all()
    (tmp_path / "notakey.ids").write_bytes(b"x")
    (tmp_path / f"{'e' * 64}.ids").write_bytes(b"truncated")
    ix = ChunkIndex.from_dir(tmp_path)
    assert sorted(ix._cid) == sorted(five)
    prompt = np.concatenate([five[key(3)], five[key(2)]])
    assert [m.key for m in ix.find(prompt)] == [key(3), key(2)]
    np.save(tmp_path / "f.npy", np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        load_ids(tmp_path / "f.npy")


def test_ids_validation(rng, five):
    ix = index_of(five)
    with pytest.raises(OverflowError):
        ix.find([1, -2, 3])
    with pytest.raises(ValueError):
        ix.find(np.array([1, -2, 3]))
    with pytest.raises(ValueError):
        ix.add(key(8), np.array([2**32] * 100))
    with pytest.raises(ValueError):
        ChunkIndex(window=32, min_match=62)


# ---- the brute-force property test ---------------------------------------------------------
def random_case(rng: np.random.Generator):
    vocab = int(rng.choice([3, 20, 5000]))
    window = int(rng.choice([1, 2, 4, 8]))
    min_match = 2 * window - 1 + int(rng.integers(0, 4))
    chunks: dict[str, list[int]] = {}
    for i in range(int(rng.integers(1, 7))):
        n = int(rng.integers(max(min_match - 3, 1), 90))
        ids = rand_ids(rng, n, vocab)
        if chunks and rng.random() < 0.4:  # share text with an earlier chunk
            other = list(chunks.values())[int(rng.integers(len(chunks)))]
            a = int(rng.integers(len(other)))
            ids = np.concatenate([ids[: n // 2], other[a:], ids[n // 2 :]])
        chunks[key(i)] = np.asarray(ids, np.uint32).tolist()
    parts: list[list[int]] = []
    for _ in range(int(rng.integers(1, 7))):
        r = rng.random()
        if r < 0.3:
            parts.append(rand_ids(rng, int(rng.integers(0, 12)), vocab).tolist())
        else:
            c = list(chunks.values())[int(rng.integers(len(chunks)))]
            a, b = sorted(rng.integers(0, len(c) + 1, 2)) if r < 0.6 else (0, len(c))
            piece = list(c[a:b])
            if piece and rng.random() < 0.3:
                piece[int(rng.integers(len(piece)))] = int(rng.integers(vocab))
            parts.append(piece)
    return chunks, sum(parts, []), window, min_match


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    nonempty = 0
    for _ in range(100):
        chunks, prompt, window, min_match = random_case(rng)
        ix = ChunkIndex(window, min_match, max_dups=10**9)
        for k, ids in chunks.items():
            ix.add(k, ids)
        if rng.random() < 0.3 and len(chunks) > 1:
            gone = key(int(rng.integers(len(chunks))))
            ix.remove(gone)
            chunks.pop(gone)
        want = ref_find(chunks, prompt, min_match)
        got = ix.find(prompt)
        assert got == want, (chunks, prompt, window, min_match)
        check_valid(got, prompt, chunks, min_match)
        nonempty += bool(want)
    assert nonempty > 30  # the cases do exercise matches


# ---- real text, SmolLM2's tokenizer --------------------------------------------------------
@pytest.fixture(scope="module")
def docs() -> list[str]:
    from pydoc_data.topics import topics

    names = ["assignment", "class", "exceptions", "for", "if", "import", "lambda", "while"]
    return [" ".join(topics[n].split()[:200]) for n in names]


def test_real_bpe_merge_at_both_edges(tok, docs):
    """'Context: ' + doc merges the space into the doc's first word ('ĠAssignment' for
    'Ass','ignment'), and doc + 's' merges its last word ('Ġas' + 's' -> 'Ġass'): those
    tokens are recomputed, the interior is one match."""
    doc = docs[0]
    c = tok.encode(doc, add_special_tokens=False)
    prompt = tok.encode("Context: " + doc + "s and then more words.", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(c[:2]) == ["Ass", "ignment"]
    assert "ĠAssignment" in tok.convert_ids_to_tokens(prompt[:4])  # the merge is real
    assert tok.convert_ids_to_tokens(c[-1:]) == ["Ġas"] and c[-1] not in prompt[-8:]
    got = index_of({key(0): c}).find(prompt)
    check_valid(got, prompt, {key(0): c}, 64)
    (m,) = got
    assert m.src_start == 2 and m.length == len(c) - 3
    assert prompt[m.start - 1] != c[1] and prompt[m.end] != c[m.src_start + m.length]


def test_real_chat_prompt_finds_every_document(tok, docs):
    """Documents tokenized alone (as stored) are found inside a chat-templated prompt."""
    chunks = {key(i): tok.encode(d, add_special_tokens=False) for i, d in enumerate(docs)}
    order = [5, 2, 7, 0, 3]
    user = "Answer from these documents.\n\n" + "\n\n".join(docs[i] for i in order)
    user += "\n\nQuestion: what does a for loop do?"
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    prompt = np.asarray(prompt if isinstance(prompt, list) else prompt["input_ids"])
    got = index_of(chunks).find(prompt)
    check_valid(got, prompt, chunks, 64)
    assert [m.key for m in got] == [key(i) for i in order]
    for m in got:  # at most the edge tokens BPE merged with the text around them are missed
        assert m.length >= len(chunks[m.key]) - 2
