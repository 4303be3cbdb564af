"""Attention for selected tokens over a paged KV cache, with an exact causal mask by position.

Queries sit at explicit, sorted, possibly non-contiguous positions. Key j of a
request sits at position j (its logical index in the block table). A query at
position p sees exactly the keys at positions <= p: never a bottom-right
aligned mask, which is wrong as soon as the queries are not the last tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .paged import INTERPRET, LOG2E, gather_tokens, to_device


def selected_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    cu_q: Sequence[int],
    block_table: torch.Tensor,
    seq_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """`[Nq, Hq, D]` output; request b's queries are `q[cu_q[b]:cu_q[b+1]]` over its first `seq_lens[b]` keys.

    SDPA with an explicit boolean mask, fp32 softmax; GQA by head grouping.
    """
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k_cache.shape[2]
    for b in range(len(seq_lens)):
        lo, hi = cu_q[b], cu_q[b + 1]
        if hi == lo:
            continue
        n = seq_lens[b]
        k = gather_tokens(k_cache, block_table[b], n)
        v = gather_tokens(v_cache, block_table[b], n)
        mask = q_pos[lo:hi, None].long() >= torch.arange(n, device=q.device)[None, :]
        qb = q[lo:hi].transpose(0, 1).float()  # [Hq, nq, D]
        kb = k.transpose(0, 1).float().repeat_interleave(hq // hkv, dim=0)
        vb = v.transpose(0, 1).float().repeat_interleave(hq // hkv, dim=0)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


# ---------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------
# One program owns TOK query tokens of one request and ALL the G query heads
# that share one KV head: its M rows are (token, head) pairs, so every K/V tile
# it loads serves G heads (GQA packing). Keys below the tile's smallest query
# position need no mask; only the keys between the smallest and the largest
# position pay for it. Tiles are found from `cu_q` alone: request b's tiles
# start at program `cu_q[b] // TOK + b`, so the grid size is known on the host
# without reading any device value.


@triton.jit
def _attend(acc, m_i, l_i, q, qpos, kbase, vbase, bt_row, lo, hi, kv_end,
            qk_scale, block_size, s_kb, s_ko, s_kd, s_vb, s_vo, s_vd, s_btn,
            MASK: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
            HEAD_DIM: tl.constexpr, ONE_BLOCK: tl.constexpr, PAGE: tl.constexpr,
            IEEE: tl.constexpr):
    """Online-softmax pass over keys [lo, hi); MASK applies the causal mask by position.

    Without MASK every key of [lo, hi) is inside the request and seen by every
    row, so loads go unpredicated. (Reading one block-table entry per page and
    expanding it with tl.reshape was slower: layout shuffles.)
    """
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    PRED: tl.constexpr = MASK or (D_PAD != HEAD_DIM)
    for start in tl.range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < kv_end
        if ONE_BLOCK:
            koff = j.to(tl.int64) * s_ko
            voff = j.to(tl.int64) * s_vo
        else:
            if PAGE > 0:  # power-of-two page: shifts and masks instead of divisions
                pg = j // PAGE
                o = (j % PAGE).to(tl.int64)
            else:
                pg = j // block_size
                o = (j % block_size).to(tl.int64)
            blk = tl.load(bt_row + pg * s_btn, mask=j_ok, other=0).to(tl.int64)
            koff = blk * s_kb + o * s_ko
            voff = blk * s_vb + o * s_vo
        kp = kbase + koff[None, :] + d[:, None] * s_kd
        if PRED:
            kt = tl.load(kp, mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            kt = tl.load(kp)
        if IEEE:  # fp32 inputs, or bf16 under the interpreter (its bf16 dot is wrong)
            qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        if MASK:  # the diagonal band: key position <= query position, and inside the request
            qk = tl.where((j[None, :] <= qpos[:, None]) & j_ok[None, :], qk, float("-inf"))
        # The softmax scale is folded into the exponent (one FMA per score).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vp = vbase + voff[:, None] + d[None, :] * s_vd
        if PRED:
            v = tl.load(vp, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(vp)
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return m_i, l_i, acc


# Sizes that change from run to run are not specialised (Triton would compile a variant per
# "== 1" and "% 16 == 0" case of each, mid-serving); the split count is a runtime value too.
@triton.jit(do_not_specialize=["num_reqs", "n_q", "s_btb", "s_lh", "num_splits"])
def _selected_attention_kernel(
    Q, K, V, Out, QPOS, CU_Q, BT, SEQ_LENS,
    qk_scale,  # softmax scale * log2(e)
    num_reqs, n_q, block_size,
    s_qt, s_qh, s_qd,
    s_kb, s_ko, s_kh, s_kd,
    s_vb, s_vo, s_vh, s_vd,
    s_ot, s_oh, s_od,
    s_btb, s_btn,
    WS_M, WS_ACC,  # split-KV partials: [splits, Nq, Hq] and [splits, Nq, Hq, D_PAD] fp32
    PO, LSE, s_pt, s_ph, s_pd, s_lh, s_lt,  # PREFIX: the keys-before-the-tile state to merge
    num_splits, SPLIT: tl.constexpr, PREFIX: tl.constexpr, NUM_KV: tl.constexpr, G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
):
    # Flat grid, heaviest tiles first across all KV heads: the hardware hands out
    # programs in order, which makes this a longest-job-first schedule.
    # With SPLIT (few tiles, long keys) each tile's keys are cut into
    # num_splits ranges whose partial softmax states `_combine_kernel` merges.
    flat = tl.num_programs(0) - 1 - tl.program_id(0)
    if SPLIT:
        split = flat % num_splits
        flat = flat // num_splits
    else:
        split = 0
    pid = flat // NUM_KV
    kvh = flat % NUM_KV

    # Request of this tile: the last b with cu_q[b] // TOK + b <= pid.
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(CU_Q + mid).to(tl.int32) // TOK + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    b = lo - 1
    q_start = tl.load(CU_Q + b).to(tl.int32)
    q_end = tl.load(CU_Q + b + 1).to(tl.int32)
    t0 = q_start + (pid - (q_start // TOK + b)) * TOK
    if t0 >= q_end:
        return
    t_last = tl.minimum(t0 + TOK, q_end) - 1
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    min_pos = tl.load(QPOS + t0).to(tl.int32)
    max_pos = tl.load(QPOS + t_last).to(tl.int32)
    kv_end = tl.minimum(max_pos + 1, seq_len)  # keys any row of the tile may see
    full_end = (tl.minimum(min_pos + 1, seq_len) // BLOCK_N) * BLOCK_N  # seen by every row

    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // G
    head = kvh * G + rows % G
    row_ok = (rows < TOK * G) & (tok < q_end)
    qpos = tl.load(QPOS + tok, mask=row_ok, other=-1).to(tl.int32)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + tok[:, None] * s_qt + head[:, None] * s_qh + d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    bt_row = BT + b * s_btb
    if ONE_BLOCK:
        kbase = K + tl.load(bt_row).to(tl.int64) * s_kb + kvh * s_kh
        vbase = V + tl.load(bt_row).to(tl.int64) * s_vb + kvh * s_vh
    else:
        kbase = K + kvh * s_kh
        vbase = V + kvh * s_vh
    if SPLIT:
        per = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        k_lo = split * per
        k_hi = tl.minimum(k_lo + per, kv_end)
    elif PREFIX:  # keys [0, min_pos] were attended elsewhere (flash): only the band is left
        k_lo = tl.minimum(min_pos + 1, kv_end)
        k_hi = kv_end
    else:
        k_lo = 0
        k_hi = kv_end
    if PREFIX:
        k_mid = k_lo
    else:
        k_mid = tl.maximum(tl.minimum(full_end, k_hi), k_lo)  # [k_lo, k_mid) needs no mask
    m_i, l_i, acc = _attend(acc, m_i, l_i, q, qpos, kbase, vbase, bt_row, k_lo, k_mid, kv_end,
                            qk_scale, block_size, s_kb, s_ko, s_kd, s_vb, s_vo, s_vd, s_btn,
                            False, BLOCK_N, D_PAD, HEAD_DIM, ONE_BLOCK, PAGE, IEEE)
    m_i, l_i, acc = _attend(acc, m_i, l_i, q, qpos, kbase, vbase, bt_row, k_mid, k_hi,
                            kv_end, qk_scale, block_size, s_kb, s_ko, s_kd, s_vb, s_vo, s_vd,
                            s_btn, True, BLOCK_N, D_PAD, HEAD_DIM, ONE_BLOCK, PAGE, IEEE)

    if SPLIT:
        r = (split * n_q.to(tl.int64) + tok.to(tl.int64)) * (NUM_KV * G) + head
        tl.store(WS_M + 2 * r, m_i, mask=row_ok)
        tl.store(WS_M + 2 * r + 1, l_i, mask=row_ok)
        tl.store(WS_ACC + r[:, None] * D_PAD + d[None, :], acc, mask=row_ok[:, None])
    elif PREFIX:
        # Merge with the prefix's normalised output and natural-log LSE (log2 units here).
        lse_a = tl.load(LSE + head * s_lh + tok * s_lt, mask=row_ok, other=-1.0e30) * 1.4426950408889634
        lse_a = tl.maximum(lse_a, -1.0e30)  # an empty prefix reports -inf
        o_a = tl.load(PO + tok[:, None] * s_pt + head[:, None] * s_ph + d[None, :] * s_pd,
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        lse_b = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), -1.0e30)
        m_all = tl.maximum(lse_a, lse_b)
        w_a = tl.math.exp2(lse_a - m_all)
        w_b = tl.math.exp2(m_i - m_all)  # acc and l_i are scaled by 2^-m_i
        den = w_a + w_b * l_i
        acc = (o_a * w_a[:, None] + acc * w_b[:, None]) / tl.where(den > 0, den, 1.0)[:, None]
        tl.store(Out + tok[:, None] * s_ot + head[:, None] * s_oh + d[None, :] * s_od,
                 acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + tok[:, None] * s_ot + head[:, None] * s_oh + d[None, :] * s_od,
                 acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["nq", "num_splits"])
def _combine_kernel(Out, WS_M, WS_ACC, nq, num_splits, s_ot, s_oh, s_od,
                    HQ: tl.constexpr, HQ_PAD: tl.constexpr,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the split-KV partial softmax states of one query token (all heads)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HQ_PAD)
    d = tl.arange(0, D_PAD)
    h_ok = h < HQ
    m = tl.full([HQ_PAD], -1.0e30, dtype=tl.float32)
    l_sum = tl.zeros([HQ_PAD], dtype=tl.float32)
    acc = tl.zeros([HQ_PAD, D_PAD], dtype=tl.float32)
    for s in range(num_splits):
        r = (s * nq + t) * HQ + h
        m_s = tl.load(WS_M + 2 * r, mask=h_ok, other=-1.0e30)
        l_s = tl.load(WS_M + 2 * r + 1, mask=h_ok, other=0.0)
        a_s = tl.load(WS_ACC + r[:, None] * D_PAD + d[None, :], mask=h_ok[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.math.exp2(m - m_new)
        beta = tl.math.exp2(m_s - m_new)
        l_sum = l_sum * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    acc = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(Out + t * s_ot + h[:, None] * s_oh + d[None, :] * s_od, acc.to(Out.dtype.element_ty),
             mask=h_ok[:, None] & (d < HEAD_DIM)[None, :])


_SM_COUNT: dict[int, int] = {}


def num_splits_for(device: torch.device, programs: int, seq_lens=None) -> int:
    """Split the keys only when the tiles alone cannot fill the GPU (e.g. a short question);
    host `seq_lens` cap it (no split below ~512 keys each), device ones or None do not."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    sms = _SM_COUNT[idx]
    if programs >= sms:
        return 1
    splits = min(16, -(-2 * sms // programs))
    if seq_lens is not None and not isinstance(seq_lens, torch.Tensor):
        splits = min(splits, max(1, max(seq_lens, default=0) // 512))
    return max(1, splits)


def _config(head_dim: int, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); from the H100 sweeps (bench/kernels.py)."""
    if INTERPRET:
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    # 128x128 tiles, 2 stages: fastest at 32k in all three sweeps (+8..16% over 3 stages),
    # a few % slower at 8k; BLOCK_N=64 tiles were as fast but 10x less accurate (1e-3).
    return 128, 128, 8, 2


def tile_tokens(num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Query tokens per kernel tile (all `G` heads of one KV head share its M rows)."""
    group = num_q_heads // num_kv_heads
    return max(1, _config(head_dim, group)[0] // group)


def prefix_tiles(cu_q: Sequence[int], tok: int) -> tuple[list[int], list[int]]:
    """The kernel's tiles as varlen sequences: (cu of tile starts and ends, request of each)."""
    cu, req = [0], []
    for b in range(len(cu_q) - 1):
        for t in range(cu_q[b], cu_q[b + 1], tok):
            cu.append(min(t + tok, cu_q[b + 1]))
            req.append(b)
    return cu, req


def prefix_attention_ref(q, k_cache, v_cache, q_pos, cu_q, block_table, scale, tok):
    """What `prefix=` expects, in plain PyTorch: per tile of `prefix_tiles`, attention over
    keys `[0, first query position]` (no mask inside), as `(o, lse)`."""
    o = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32,
                     device=q.device)
    hq, hkv = q.shape[1], k_cache.shape[2]
    cu, req = prefix_tiles(list(cu_q), tok)
    for t, b in enumerate(req):
        lo, hi = cu[t], cu[t + 1]
        n = int(q_pos[lo]) + 1
        k = gather_tokens(k_cache, block_table[b], n).float().repeat_interleave(hq // hkv, 1)
        v = gather_tokens(v_cache, block_table[b], n).float().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale
        lse[:, lo:hi] = torch.logsumexp(s, -1)
        o[lo:hi] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)
    return o, lse


def selected_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    cu_q: Sequence[int] | torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    scale: float,
    config: tuple[int, int, int, int] | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton version of `selected_attention_ref` (same arguments, same result).

    `cu_q` / `seq_lens` may be host sequences or device int tensors; host ones
    travel through pinned memory without a device sync. `config` overrides the
    tile shape (benchmarks only); `out` (shaped like `q`) receives the result;
    `num_splits` forces the split-KV count (chosen from the grid size otherwise).

    `prefix=(o, lse)`: each tile's keys up to its first query's position are
    already attended (`o` `[Nq, Hq, D]` normalised, `lse` `[Hq, Nq]` natural log,
    as flash attention returns them over the tiles of `prefix_tiles`); the kernel
    attends only the masked band after them and merges. `o` may be `out`.
    """
    nq, hq, dim = q.shape
    hkv = k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    nreq = len(cu_q) - 1
    if nq == 0 or nreq == 0:
        return out
    group = hq // hkv
    bm, bn, warps, stages = config or _config(dim, group)
    tok = max(1, bm // group)
    bm = triton.next_power_of_2(tok * group)
    dev = q.device
    cu_q_t = to_device(cu_q, dev)
    seq_t = to_device(seq_lens, dev)
    programs = (nq // tok + nreq) * hkv
    splits = 1 if prefix is not None else num_splits or num_splits_for(dev, programs, seq_lens)
    d_pad = triton.next_power_of_2(dim)
    if splits > 1:
        ws_m = torch.empty((splits, nq, hq, 2), dtype=torch.float32, device=dev)
        ws_acc = torch.empty((splits, nq, hq, d_pad), dtype=torch.float32, device=dev)
    else:
        ws_m = ws_acc = out  # unused
    bs = k_cache.shape[1]
    page = bs if bs & (bs - 1) == 0 and bs <= 4096 else 0
    one_block = block_table.shape[1] == 1
    _selected_attention_kernel[(programs * splits,)](
        q, k_cache, v_cache, out, q_pos, cu_q_t, block_table, seq_t,
        scale * LOG2E, nreq, nq, k_cache.shape[1],
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *block_table.stride(), ws_m, ws_acc,
        *((prefix[0], prefix[1], *prefix[0].stride(), *prefix[1].stride()) if prefix is not None
          else (out, out, 0, 0, 0, 0, 0)),
        splits, SPLIT=splits > 1, PREFIX=prefix is not None, NUM_KV=hkv, G=group, TOK=tok, BLOCK_M=bm, BLOCK_N=bn,
        HEAD_DIM=dim, D_PAD=d_pad,
        ONE_BLOCK=one_block, PAGE=page,
        IEEE=q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16),
        num_warps=warps, num_stages=stages,
    )
    if splits > 1:
        _combine_kernel[(nq,)](out, ws_m, ws_acc, nq, splits, *out.stride(), HQ=hq,
                               HQ_PAD=triton.next_power_of_2(hq),
                               HEAD_DIM=dim, D_PAD=d_pad, num_warps=4)
    return out
