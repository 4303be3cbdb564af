"""Per-token KV deviation and HKVD top-k selection.

Deviation compares the fresh K/V a check layer just computed with the cached
K/V already in the paged cache; the tokens that deviate most are the ones whose
cached KV would hurt quality, so they are recomputed (CacheBlend's HKVD set).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .paged import INTERPRET, split_slots, to_device

METRICS = ("v_l2", "k_l2", "k_l1", "kv_l2")


def token_deviation_ref(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    metric: str = "v_l2",
) -> torch.Tensor:
    """Deviation `[N]` (fp32) of fresh `[N, H, D]` K/V from the cached K/V at `slots`.

    v_l2 / k_l2: squared L2 norm of the difference (over heads and dims);
    k_l1: L1 norm of the K difference; kv_l2: v_l2 + k_l2.
    """
    if metric not in METRICS:
        raise ValueError(f"deviation metric {metric!r} not in {METRICS}")
    blk, off = split_slots(slots, k_cache.shape[1])
    n = k_new.shape[0]
    out = torch.zeros(n, dtype=torch.float32, device=k_new.device)
    if metric in ("k_l2", "kv_l2", "k_l1"):
        dk = k_new.float() - k_cache[blk, off].float()
        out += dk.abs().flatten(1).sum(-1) if metric == "k_l1" else dk.square().flatten(1).sum(-1)
    if metric in ("v_l2", "kv_l2"):
        dv = v_new.float() - v_cache[blk, off].float()
        out += dv.square().flatten(1).sum(-1)
    return out


# One program reduces BLOCK_T tokens over all (head, dim) elements at once, in
# fp32; only the tensors the metric needs are read (v_l2 reads V alone).
@triton.jit(do_not_specialize=["n"])  # sizes vary per run: no recompiles
def _deviation_kernel(
    OUT, KN, VN, K, V, SLOTS, n, block_size,
    s_knt, s_knh, s_knd, s_vnt, s_vnh, s_vnd,
    s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_K: tl.constexpr, USE_V: tl.constexpr, K_L1: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    slot = tl.load(SLOTS + t, mask=t_ok, other=0).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    e = tl.arange(0, HD_PAD)
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    m = t_ok[:, None] & (e < H * HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    if USE_K:
        kn = tl.load(KN + t64 * s_knt + h[None, :] * s_knh + d[None, :] * s_knd, mask=m, other=0.0)
        kc = tl.load(K + (blk * s_kb + off * s_ko)[:, None] + h[None, :] * s_kh + d[None, :] * s_kd,
                     mask=m, other=0.0)
        dk = kn.to(tl.float32) - kc.to(tl.float32)
        if K_L1:
            acc += tl.sum(tl.abs(dk), 1)
        else:
            acc += tl.sum(dk * dk, 1)
    if USE_V:
        vn = tl.load(VN + t64 * s_vnt + h[None, :] * s_vnh + d[None, :] * s_vnd, mask=m, other=0.0)
        vc = tl.load(V + (blk * s_vb + off * s_vo)[:, None] + h[None, :] * s_vh + d[None, :] * s_vd,
                     mask=m, other=0.0)
        dv = vn.to(tl.float32) - vc.to(tl.float32)
        acc += tl.sum(dv * dv, 1)
    tl.store(OUT + t, acc, mask=t_ok)


def token_deviation(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    metric: str = "v_l2",
) -> torch.Tensor:
    """Triton version of `token_deviation_ref`: deviation `[N]` fp32, no sync."""
    if metric not in METRICS:
        raise ValueError(f"deviation metric {metric!r} not in {METRICS}")
    n = slots.numel()
    out = torch.empty(n, dtype=torch.float32, device=k_new.device)
    if n == 0:
        return out
    _, _, h, dim = k_cache.shape
    hd_pad = triton.next_power_of_2(h * dim)
    block_t = 4 if INTERPRET else max(1, min(64, 4096 // hd_pad))
    _deviation_kernel[(triton.cdiv(n, block_t),)](
        out, k_new, v_new, k_cache, v_cache, slots, n, k_cache.shape[1],
        *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        H=h, HEAD_DIM=dim, HD_PAD=hd_pad, BLOCK_T=block_t,
        USE_K=metric != "v_l2", USE_V=metric in ("v_l2", "kv_l2"), K_L1=metric == "k_l1",
        num_warps=4 if hd_pad <= 2048 else 8,
    )
    return out


def hkvd_select(
    dev: torch.Tensor,
    forced: torch.Tensor,
    cu_tokens: Sequence[int],
    num_take: Sequence[int],
) -> torch.Tensor:
    """Indices (ascending, int64) of the tokens to keep computing, per request.

    Request b owns tokens `cu_tokens[b]:cu_tokens[b+1]` and keeps `num_take[b]`
    of them (clamped to its length): `forced` tokens rank first (the caller
    counts them into `num_take` from host metadata), then the highest deviation;
    ties go to the lower index. Sizes come from the host, so there is no sync.
    On CUDA: one pinned metadata copy, two small kernels and two sorts.
    """
    if dev.device.type != "cuda" and not INTERPRET:
        return _hkvd_select_torch(dev, forced, cu_tokens, num_take)
    device = dev.device
    nreq = len(num_take)
    lens, take, meta_host = _select_meta(cu_tokens, num_take)
    n_take = sum(take)
    if nreq == 0 or sum(lens) == 0 or n_take == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    width = max(lens)
    meta = to_device(meta_host, device)
    score = torch.empty((nreq, width), dtype=torch.float32, device=device)
    blk = 256 if not INTERPRET else 64
    _hkvd_score_kernel[(nreq, triton.cdiv(width, blk))](
        score, dev, forced, meta, nreq, width, BLOCK=blk)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    picked = torch.empty(n_take, dtype=torch.long, device=device)
    _hkvd_gather_kernel[(triton.cdiv(n_take, blk),)](
        picked, order, meta, nreq, n_take, order.stride(0), BLOCK=blk)
    return torch.sort(picked).values


def _select_meta(cu_tokens: Sequence[int], num_take: Sequence[int]
                 ) -> tuple[list[int], list[int], list[int]]:
    """(lens, clamped take, device metadata: starts | lens | take_start) for `hkvd_select`."""
    nreq = len(num_take)
    lens = [cu_tokens[b + 1] - cu_tokens[b] for b in range(nreq)]
    take = [min(lens[b], max(0, num_take[b])) for b in range(nreq)]
    return lens, take, [*cu_tokens[:-1], *lens, 0, *_cumsum(take)]


def preload_select(cu_tokens: Sequence[int], num_take: Sequence[int],
                   device: torch.device) -> None:
    """Upload now the metadata a later `hkvd_select` with these sizes copies (cached by value).

    A blend queues gigabytes of chunk KV on the host-to-device engine; a small
    copy issued after them would wait behind them and stall its layer.
    """
    to_device(_select_meta(cu_tokens, num_take)[2], device)


@triton.jit(do_not_specialize=["nreq", "width"])  # sizes vary per run: no recompiles
def _hkvd_score_kernel(SCORE, DEV, FORCED, META, nreq, width, BLOCK: tl.constexpr):
    """Padded per-request score rows, ranked exactly as the reference ranks them."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    start = tl.load(META + b)
    n = tl.load(META + nreq + b)
    ok = c < n
    x = tl.load(DEV + start + c, mask=ok, other=0.0).to(tl.float32)
    f = tl.load(FORCED + start + c, mask=ok, other=0) != 0
    fmax: tl.constexpr = 3.4028234663852886e38
    x = tl.where(x == float("inf"), fmax, x)  # nan_to_num: +inf -> max, -inf -> min, nan -> -inf
    x = tl.where(x == float("-inf"), -fmax, x)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(f, float("inf"), x)  # forced: above every deviation, +inf ones included
    x = tl.where(ok, x, float("-inf"))
    tl.store(SCORE + b.to(tl.int64) * width + c, x, mask=c < width)


@triton.jit(do_not_specialize=["nreq", "n_take", "s_order"])  # sizes vary per run: no recompiles
def _hkvd_gather_kernel(OUT, ORDER, META, nreq, n_take, s_order, BLOCK: tl.constexpr):
    """Output i -> (request, rank) -> token index: the top `take[b]` of each sorted row."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_take
    req = tl.zeros([BLOCK], dtype=tl.int32)
    for b in range(1, nreq):
        req += (i >= tl.load(META + 2 * nreq + b)).to(tl.int32)
    rank = i - tl.load(META + 2 * nreq + req, mask=ok, other=0)
    col = tl.load(ORDER + req.to(tl.int64) * s_order + rank, mask=ok, other=0)
    tl.store(OUT + i, col + tl.load(META + req, mask=ok, other=0), mask=ok)


def _hkvd_select_torch(
    dev: torch.Tensor,
    forced: torch.Tensor,
    cu_tokens: Sequence[int],
    num_take: Sequence[int],
) -> torch.Tensor:
    """Pure-torch `hkvd_select` (CPU path): same result, no device sync on CUDA either."""
    device = dev.device
    nreq = len(num_take)
    lens = [cu_tokens[b + 1] - cu_tokens[b] for b in range(nreq)]
    if nreq == 0 or sum(lens) == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    width = max(lens)
    take = [min(lens[b], max(0, num_take[b])) for b in range(nreq)]
    total = dev.shape[0]
    # Small host-built index tensors go through pinned memory (to_device): no sync.
    lens_t = to_device(lens, device)
    starts = to_device(list(cu_tokens[:-1]), device)
    take_t = to_device(take, device)
    take_start = to_device([0, *_cumsum(take)[:-1]], device)
    # Forced tokens rank above everything; padding ranks below everything.
    score = torch.full((nreq, width), float("-inf"), dtype=torch.float32, device=device)
    owner = torch.repeat_interleave(torch.arange(nreq, device=device), lens_t,
                                    output_size=total)
    col = torch.arange(total, device=device) - starts[owner]
    ranked = torch.nan_to_num(dev.float(), nan=float("-inf"),
                              neginf=torch.finfo(torch.float32).min)  # +inf -> max finite
    ranked = torch.where(forced, torch.full_like(ranked, float("inf")), ranked)
    score[owner, col] = ranked
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    n_take = sum(take)
    req = torch.repeat_interleave(torch.arange(nreq, device=device), take_t,
                                  output_size=n_take)
    j = torch.arange(n_take, device=device) - take_start[req]
    picked = order[req, j] + starts[req]
    return torch.sort(picked).values


def _cumsum(xs: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def hkvd_select_ref(
    dev: torch.Tensor,
    forced: torch.Tensor,
    cu_tokens: Sequence[int],
    num_take: Sequence[int],
) -> torch.Tensor:
    """A plain per-request loop with the same ranking rules: the test oracle."""
    big = torch.finfo(torch.float32).min
    picked: list[int] = []
    for b in range(len(num_take)):
        lo, hi = cu_tokens[b], cu_tokens[b + 1]
        score = dev[lo:hi].float().cpu().nan_to_num(nan=float("-inf"), neginf=big)
        score[forced[lo:hi].cpu()] = float("inf")
        order = sorted(range(hi - lo), key=lambda i, s=score: (-float(s[i]), i))
        picked += [lo + i for i in order[:min(hi - lo, max(0, num_take[b]))]]
    return torch.tensor(sorted(picked), dtype=torch.long, device=dev.device)
