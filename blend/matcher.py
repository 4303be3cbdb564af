"""Find stored chunks inside a prompt by their token ids alone: no spans, no separator.

Chat clients paste retrieved documents into a message, so the connector only sees one
token sequence. `ChunkIndex` keeps, for every stored chunk, the hashes of its windows of
`window` tokens at stride `window` (anchors). `find` hashes the window at *every* prompt
position (one vectorised polynomial hash), looks the hashes up, verifies each hit exactly
against the stored ids, extends it to the maximal equal run, and picks disjoint matches.

Any equal run of `min_match >= 2 * window - 1` tokens contains a whole anchor, so none is
missed. Hash hits are only candidates: a match is claimed only where the prompt's tokens
equal the chunk's, so a boundary token BPE merged with its neighbours (or any changed
token) is never part of a match. Engine-free: numpy only.
"""

from __future__ import annotations

import array
import bisect
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_U64 = np.uint64
_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_MIN_SMALL = 2048  # anchors the small level may hold before it merges into the main one
_EMPTY_I = np.empty(0, np.int64)
_HEX = re.compile("[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Match:
    """Prompt tokens `[start, end)` equal the chunk `key`'s tokens `[src_start, src_start + end - start)`."""

    start: int
    end: int
    key: str
    src_start: int

    @property
    def length(self) -> int:
        return self.end - self.start


# ---- hashing ---------------------------------------------------------------------------------
class _Powers:
    """B**k and B**-k mod 2**64 for k < n, grown on demand.

    One tuple swapped whole, so a thread never sees a longer `fwd` with a shorter `inv`."""

    def __init__(self) -> None:
        self.pair = (np.empty(0, _U64), np.empty(0, _U64))

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pair
        if len(pair[0]) < n:
            m = max(n, 2 * len(pair[0]), 1024)
            fwd, inv = np.full(m, _BASE, _U64), np.full(m, _BASE_INV, _U64)
            fwd[0] = inv[0] = 1
            pair = self.pair = (np.cumprod(fwd), np.cumprod(inv))  # wraps mod 2**64
        return pair


_POW = _Powers()


def window_hashes(ids: np.ndarray, window: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """Hash of `ids[i:i+window]` for every i (polynomial mod 2**64, position-independent).

    With prefix sums P[i] = sum_{k<i} ids[k] B**k, the window at i is (P[i+w] - P[i]) B**-i,
    so every position costs a few vector ops. `scratch` (uint64, >= 2 * len(ids) + 1) avoids
    fresh allocations, which page-fault on every call for 32k-token prompts.
    """
    n = len(ids)
    if n < window:
        return np.empty(0, _U64)
    fwd, inv = _POW.get(n + 1)
    if scratch is None:
        scratch = np.empty(2 * n + 1, _U64)
    x, pre = scratch[:n], scratch[n : 2 * n + 1]
    np.multiply(ids, fwd[:n], out=x, casting="unsafe")
    pre[0] = 0
    np.cumsum(x, out=pre[1:])
    out = x[: n - window + 1]  # x is consumed: reuse it for the result
    np.subtract(pre[window:], pre[: n - window + 1], out=out)
    out *= inv[: n - window + 1]
    return out


def as_ids(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous uint32 array (a list goes through `array`: 3x np.asarray's speed)."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype == np.uint32:
            return np.ascontiguousarray(token_ids)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() > 0xFFFFFFFF):
            raise ValueError("token ids must be in [0, 2**32)")
        return token_ids.astype(np.uint32)
    return np.frombuffer(array.array("I", token_ids), np.uint32)


# ---- persistence -------------------------------------------------------------------------------
def dump_ids(path: str | os.PathLike, token_ids: Sequence[int] | np.ndarray) -> None:
    """Write a chunk's token ids (uint32 .npy) atomically, so a store can keep them beside its KV."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, as_ids(token_ids), allow_pickle=False)
    os.replace(tmp, path)


def load_ids(path: str | os.PathLike) -> np.ndarray:
    """Token ids written by `dump_ids`."""
    ids = np.load(path, allow_pickle=False)
    if ids.dtype != np.uint32 or ids.ndim != 1:
        raise ValueError(f"{path}: not a token-id file ({ids.dtype}, {ids.ndim}-d)")
    return ids


def _scan(root: Path, suffix: str) -> Iterable[tuple[str, np.ndarray]]:
    """(key, ids) of each readable id file under root; others are skipped (a store's business)."""
    for f in sorted(root.rglob("*" + suffix)):
        key = f.name[: -len(suffix)]
        if len(key) != 64 or not _HEX.fullmatch(key):
            continue
        try:
            yield key, load_ids(f)
        except (OSError, ValueError):
            continue


# ---- small array helpers -----------------------------------------------------------------------
def _grow(a: np.ndarray, n: int) -> np.ndarray:
    """`a` with room for n elements (doubling, so appends are amortised O(1))."""
    if len(a) >= n:
        return a
    b = np.zeros(max(n, 2 * len(a), 64), a.dtype)
    b[: len(a)] = a
    return b


def _expand(lo: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Concatenation of range(lo[i], lo[i] + cnt[i]) for all i, without a Python loop."""
    total = int(cnt.sum())
    starts = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
    return starts + np.arange(total)


def _over(a: np.ndarray, bound: int, limit: int) -> np.ndarray:
    """Mask of the elements of `a` (ints in [0, bound)) that occur more than `limit` times."""
    if len(a) * 16 > bound:  # many: counting is O(len + bound), no sort
        return np.bincount(a, minlength=bound)[a] > limit
    s = np.sort(a)
    hot = s[limit:][s[limit:] == s[: len(s) - limit]]  # s[i] == s[i + limit]: > limit copies
    return np.isin(a, hot) if len(hot) else np.zeros(len(a), bool)


def _windows(a: np.ndarray, window: int) -> np.ndarray:
    """Rows a[i:i+window] for every i, as a view (cheaper than as_strided/sliding_window_view)."""
    n, st = max(len(a) - window + 1, 0), a.strides[0]
    return np.ndarray((n, window), a.dtype, buffer=a, strides=(st, st))  # a: contiguous


class _Level:
    """One sorted run of anchors, grouped by hash, with a bucket table over the hashes.

    `he`, `c`, `o`: every anchor's hash, chunk id and offset, sorted by hash; `h`: the distinct
    hashes, whose anchors are `gs[g]:gs[g+1]`. `starts[b]`: the first distinct hash with top
    bits b, so a lookup is two gathers, not a binary search, and a boilerplate hash is one
    group, skipped without expanding it.
    """

    __slots__ = ("he", "c", "o", "h", "gs", "shift", "starts")

    def __init__(self, he: np.ndarray, c: np.ndarray, o: np.ndarray) -> None:
        order = np.argsort(he, kind="stable")  # timsort: O(n) on two concatenated sorted runs
        self.he, self.c, self.o = he[order], c[order], o[order]
        first = np.ones(len(he), bool)
        first[1:] = self.he[1:] != self.he[:-1]
        self.h = self.he[first]
        self.gs = np.append(np.flatnonzero(first), len(he))
        bits = int(np.clip(np.ceil(np.log2(max(len(self.h), 1) * 4)), 4, 22))  # ~4 buckets a hash
        self.shift = _U64(64 - bits)
        counts = np.bincount((self.h >> self.shift).view(np.int64), minlength=1 << bits)
        self.starts = np.zeros((1 << bits) + 1, np.int32 if len(he) < 2**31 else np.int64)
        np.cumsum(counts, out=self.starts[1:])

    @staticmethod
    def empty() -> _Level:
        return _Level(np.empty(0, _U64), np.empty(0, np.int64), np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.he)

    def merged(self, other: _Level) -> _Level:
        return _Level(np.concatenate([self.he, other.he]), np.concatenate([self.c, other.c]),
                      np.concatenate([self.o, other.o]))

    def lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, group index, group size) of each query hash stored here."""
        b = (q >> self.shift).view(np.int64)
        lo = self.starts[b]
        cnt = self.starts[b + 1] - lo
        qi = np.repeat(np.arange(len(q)), cnt)
        gi = _expand(lo, cnt)
        eq = self.h[gi] == q[qi]
        qi, gi = qi[eq], gi[eq]
        return qi, gi, self.gs[gi + 1] - self.gs[gi]


# ---- the index -----------------------------------------------------------------------------------
class ChunkIndex:
    """Stored chunks by token ids; `find` returns where they occur in a prompt.

    Thread-safe: `add`/`remove` (e.g. the saver thread) and `find` (the scheduler) take one
    lock. `add` only hashes the chunk and appends to a pending list; the next `find` (or
    `flush`) sorts pending anchors into a small level, which merges into the main level
    once it exceeds an eighth of it: a flush after one add re-sorts <= 1/8 of the anchors,
    and the costlier merge runs only once per many adds.
    """

    def __init__(self, window: int = 32, min_match: int = 64, max_dups: int = 16) -> None:
        """`max_dups`: a window stored in more places than this (boilerplate), or found at more
        prompt positions (periodic text, a chunk pasted > max_dups times), is not an anchor;
        runs still extend across it, so only runs made of nothing else are missed."""
        if window < 1 or min_match < 2 * window - 1:
            raise ValueError(f"need min_match >= 2 * window - 1 ({min_match=}, {window=})")
        self.window, self.min_match, self.max_dups = window, min_match, max_dups
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._flat = np.zeros(0, np.uint32)  # every chunk's ids, back to back (append-only)
        self._nflat = 0
        self._flat_win: np.ndarray | None = None
        self._base = np.zeros(0, np.int64)  # per chunk id: offset in _flat, length, alive
        self._len = np.zeros(0, np.int64)
        self._alive = np.zeros(0, bool)
        self._keys: list[str] = []
        self._cid: dict[str, int] = {}
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._main, self._small = _Level.empty(), _Level.empty()
        self._table = np.zeros(1, bool)  # prefilter: any anchor has these top hash bits
        self._shift = _U64(63)
        self._dead_tokens = 0
        self._scratch = np.empty(0, _U64)  # find's buffers, reused: fresh ones page-fault
        self._mask = np.empty(0, bool)

    # ---- contents ----
    def __len__(self) -> int:
        return len(self._cid)

    def __contains__(self, key: object) -> bool:
        return key in self._cid

    def add(self, key: str, token_ids: Sequence[int] | np.ndarray) -> None:
        """Index a chunk (no-op when `key` is indexed or the chunk is shorter than `min_match`)."""
        ids = as_ids(token_ids)
        if len(ids) < self.min_match:
            return
        h = window_hashes(ids, self.window)[:: self.window]
        with self._lock:
            if key not in self._cid:
                self._append(key, ids, h)

    def add_many(self, items: Iterable[tuple[str, Sequence[int] | np.ndarray]]) -> None:
        """`add` for each (key, ids), then one sort (a store's start-up scan)."""
        for key, ids in items:
            self.add(key, ids)
        self.flush()

    def _append(self, key: str, ids: np.ndarray, h: np.ndarray) -> None:
        cid, n0 = len(self._keys), self._nflat
        self._flat = _grow(self._flat, n0 + len(ids))
        self._flat[n0 : n0 + len(ids)] = ids
        self._flat_win = None
        self._nflat += len(ids)
        self._base, self._len = _grow(self._base, cid + 1), _grow(self._len, cid + 1)
        self._alive = _grow(self._alive, cid + 1)
        self._base[cid], self._len[cid], self._alive[cid] = n0, len(ids), True
        self._keys.append(key)
        self._cid[key] = cid
        offs = np.arange(len(h), dtype=np.int64) * self.window
        self._pending.append((h, np.full(len(h), cid, np.int64), offs))

    def remove(self, key: str) -> None:
        """Forget a chunk; its ids are dropped when dead ids outweigh live ones (re-index)."""
        with self._lock:
            cid = self._cid.pop(key, None)
            if cid is None:
                return
            self._alive[cid] = False
            self._dead_tokens += int(self._len[cid])
            if self._dead_tokens > max(self._nflat - self._dead_tokens, 1 << 16):
                self._compact()

    def _compact(self) -> None:
        """Re-index the live chunks into a fresh state, then swap it in: the unlocked readers
        (`in`, `len`, find's empty check) see the old key dict or the new one, never a part."""
        fresh = ChunkIndex(self.window, self.min_match, self.max_dups)
        for key, c in self._cid.items():
            ids = self._flat[self._base[c] : self._base[c] + self._len[c]].copy()
            fresh._append(key, ids, window_hashes(ids, self.window)[:: self.window])
        fresh._flush()
        state = vars(fresh)
        del state["_lock"]
        vars(self).update(state)

    def flush(self) -> None:
        """Sort pending anchors in now (otherwise the next `find` does it)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        h, c, o = (np.concatenate(a) for a in zip(*self._pending))
        self._pending = []
        self._small = self._small.merged(_Level(h, c, o))
        if len(self._small) > max(_MIN_SMALL, len(self._main) // 8):
            self._main, self._small = self._main.merged(self._small), _Level.empty()
        self._update_table(h)

    def _update_table(self, new: np.ndarray) -> None:
        """Prefilter of ~16 slots per anchor: most prompt windows stop at one table read."""
        total = len(self._main) + len(self._small)
        bits = int(np.clip(np.ceil(np.log2(16 * total)), 10, 24))
        if len(self._table) != 1 << bits:
            self._table = np.zeros(1 << bits, bool)
            self._shift = _U64(64 - bits)
            new = np.concatenate([self._main.he, self._small.he])
        self._table[new >> self._shift] = True

    @classmethod
    def from_dir(cls, root: str | os.PathLike, suffix: str = ".ids", **kw) -> ChunkIndex:
        """An index of every `<64-hex key><suffix>` file under `root` (written by `dump_ids`)."""
        index = cls(**kw)
        index.add_many(_scan(Path(root), suffix))
        return index

    # ---- lookup ----
    def find(self, prompt: Sequence[int] | np.ndarray) -> list[Match]:
        """Disjoint matches of >= `min_match` tokens, sorted by start (see `Match`)."""
        if not self._cid:  # nothing stored: not even the list -> array conversion
            return []
        p = as_ids(prompt)
        with self._lock:
            if not self._cid or len(p) < self.min_match:
                return []
            self._flush()
            pos, cid, off = self._hits(p)
            if not len(pos):
                return []
            runs = self._runs(p, pos, cid, off)
            keys = self._keys
        return _select(runs, keys, self.min_match)

    def _hits(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Verified anchor hits: prompt position, chunk id, offset in the chunk."""
        if len(self._scratch) < 2 * len(p) + 1:
            self._scratch = np.empty(2 * len(p) + 1, _U64)
            self._mask = np.empty(len(p), bool)
        hp = window_hashes(p, self.window, self._scratch)
        slot = self._scratch[len(p) : len(p) + len(hp)].view(np.int64)  # free once hashed
        np.right_shift(hp, self._shift, out=slot.view(_U64))
        mask = self._mask[: len(hp)]
        np.take(self._table, slot, out=mask)  # intp indices: numpy's fast path (uint64 ones are not)
        pos = np.flatnonzero(mask)
        if not len(pos):
            return _EMPTY_I, _EMPTY_I, _EMPTY_I
        q = hp[pos]
        found = [(lv, *lv.lookup(q)) for lv in (self._main, self._small) if len(lv)]
        if not any(len(qi) for _, qi, _, _ in found):
            return _EMPTY_I, _EMPTY_I, _EMPTY_I
        # ambiguous windows are no anchors: stored in over max_dups places (boilerplate), or
        # at over max_dups prompt positions (periodic text: one run per shift); skipped
        # before their anchors are expanded, so neither costs more than the lookup
        dups = np.zeros(len(q), np.int64)
        for _, qi, _, n in found:
            dups[qi] += n  # a hash is one group per level: qi has no repeats
        parts = []
        for lv, qi, gi, n in found:
            ok = (dups[qi] <= self.max_dups) & ~_over(gi, len(lv.h), self.max_dups)
            qi, gi, n = qi[ok], gi[ok], n[ok]
            ei = _expand(lv.gs[gi], n)
            parts.append((np.repeat(pos[qi], n), lv.c[ei], lv.o[ei]))
        pos, cid, off = (np.concatenate(a) for a in zip(*parts))
        keep = self._alive[cid] & (pos >= off)  # see _runs: a chunk cannot start before 0
        pos, cid, off = pos[keep], cid[keep], off[keep]
        same = _windows(p, self.window)[pos] == self._flat_windows()[self._base[cid] + off]
        keep = same.all(axis=1)
        return pos[keep], cid[keep], off[keep]

    def _flat_windows(self) -> np.ndarray:
        """Every window of the stored ids as rows of a strided view (cached until an add)."""
        if self._flat_win is None:
            self._flat_win = _windows(self._flat[: self._nflat], self.window)
        return self._flat_win

    def _runs(self, p: np.ndarray, pos: np.ndarray, cid: np.ndarray, off: np.ndarray) -> np.ndarray:
        """Maximal equal runs through the hits: rows of (start, end, chunk id, src_start).

        A run on diagonal d pairs prompt position i with chunk offset i - d. `_hits` dropped
        d < 0: the chunk's start would sit before position 0, where the connector cannot place it.
        """
        diag = pos - off
        # hits come by prompt position, so a stable sort by (chunk, diagonal) orders offsets too
        key = (cid << 32) | diag
        order = np.argsort(key, kind="stable")
        key, pos, cid, off, diag = key[order], pos[order], cid[order], off[order], diag[order]
        # consecutive verified anchors of one chunk on one diagonal form one equal run
        new = np.empty(len(pos), bool)
        new[0] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        new[1:] |= off[1:] != off[:-1] + self.window
        first = np.flatnonzero(new)
        last = np.concatenate([first[1:], [len(pos)]]) - 1
        c, d, key = cid[first], diag[first], key[first]
        base = self._base[c] - d  # flat index of the chunk token at prompt position i: base + i
        r = len(c)
        edge = self._extend(p, np.concatenate([base, base]),
                            np.concatenate([pos[first], pos[last] + self.window]),
                            np.concatenate([d, np.minimum(len(p), d + self._len[c])]),
                            np.repeat(np.array([-1, 1]), r))
        start, end = edge[:r], edge[r:]
        # runs of one diagonal were sorted by start and are disjoint once maximal: a repeat
        # (a run split at a skipped anchor, extended back into one) is its predecessor
        keep = end - start >= self.min_match
        keep[1:] &= (key[1:] != key[:-1]) | (start[1:] != start[:-1])
        rows = np.empty((int(keep.sum()), 4), np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2] = start[keep], end[keep], c[keep]
        rows[:, 3] = rows[:, 0] - d[keep]
        return rows

    def _extend(self, p, base, edge, limit, step) -> np.ndarray:
        """Move each `edge` towards its `limit` (step -1: left, +1: right) while tokens match.

        The first round checks `window` tokens: the next anchor was not a hit, so the run
        rarely goes further. Only across windows that are no anchors (see `max_dups`) does an
        edge need more rounds; each doubles the span, so a long stretch costs log rounds.
        """
        edge = edge.copy()
        act = np.flatnonzero(edge != limit)
        span = self.window
        while len(act):
            w = np.arange(span)
            e, st = edge[act], step[act]
            room = np.abs(limit[act] - e)
            idx = e[:, None] + st[:, None] * w - (st < 0)[:, None]  # left: e-1-w, right: e+w
            valid = w < np.minimum(room, span)[:, None]
            idx = np.where(valid, idx, idx[:, :1])  # in range (room >= 1), masked out below
            eq = (p[idx] == self._flat[base[act, None] + idx]) & valid
            n = np.where(eq.all(axis=1), span, np.argmin(eq, axis=1))
            edge[act] = e + st * n
            act = act[(n == span) & (room > span)]
            span *= 2
        return edge


def _select(runs: np.ndarray, keys: list[str], min_match: int) -> list[Match]:
    """Disjoint matches, longest run first, each clipped to the prompt not yet taken.

    Longest first (not left to right) keeps a whole chunk whole when another stored chunk
    shares part of its text, or the same text is stored as overlapping pieces: fewer,
    longer pieces mean fewer boundary tokens to recompute and fewer fetches.
    """
    cands = sorted(((s - e, s, keys[c], s0) for s, e, c, s0 in runs.tolist()))
    starts: list[int] = []  # chosen pieces, sorted and disjoint
    ends: list[int] = []
    out: list[Match] = []
    for neg, s, key, s0 in cands:
        e = s - neg
        i = bisect.bisect_right(ends, s)  # first chosen piece ending after s
        cur = s
        while cur < e:
            nxt = starts[i] if i < len(starts) and starts[i] < e else e
            if nxt - cur >= min_match:
                out.append(Match(cur, nxt, key, s0 + cur - s))
                starts.insert(i, cur)
                ends.insert(i, nxt)
                i += 1
            if nxt == e:
                break
            cur, i = ends[i], i + 1
    out.sort(key=lambda m: m.start)
    return out
