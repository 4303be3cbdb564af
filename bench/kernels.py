"""Kernel benchmark on the GPU -> bench/results/kernels.json (+ a printed table).

Selected-token attention: 15% of the positions of an 8k / 32k context, random
and sorted, 32 query heads over 8 KV heads, d=128, bf16; TFLOP/s counts useful
FLOPs only (a query at position p sees p+1 keys, 4*d FLOPs per (query, key,
head)). Side by side, in the same run: SDPA causal flash over the whole context
(the full-prefill attention) and SDPA with the dense boolean mask (the naive
blend). Memory-bound kernels report GB/s against a device copy measured here.
Times are medians of CUDA-event timings after warm-up (triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from blend.triton_kernels._testing import paged_cache, slots_of, sorted_positions
from blend.triton_kernels.attention import selected_attention
from blend.triton_kernels.deviation import hkvd_select, token_deviation
from blend.triton_kernels.kv_fusion import fuse_kv
from blend.triton_kernels.rope import delta_cos_sin, rerotate_k

HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16
CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
]  # run 1 also tried (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 4): always slower


def bench(fn, rep: int = 200) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")


def copy_gbps() -> float:
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    b = torch.randn(8192, 8192, dtype=DT, device="cuda")
    ms = bench(lambda: a @ b, rep=100)
    return 2 * 8192**3 / ms / 1e9


def attention_case(ctx: int, frac: float, block_size: int, configs, gen) -> dict:
    nsel = round(frac * ctx)
    kc, vc, table = paged_cache([ctx], block_size, HKV, D, DT, "cuda", spare_blocks=0, gen=gen)
    pos = sorted_positions(ctx, nsel, gen)
    q_pos = pos.to(torch.int32).cuda()
    q = torch.randn(nsel, HQ, D, generator=gen).to(DT).cuda()
    cu = torch.tensor([0, nsel], dtype=torch.int32, device="cuda")
    lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    scale = D**-0.5
    useful = 4.0 * D * HQ * float((pos + 1).sum())
    rows = []
    best = None
    for cfg in configs:
        try:
            out = selected_attention(q, kc, vc, q_pos, cu, table, lens, scale, config=cfg)
            ms = bench(lambda cfg=cfg: selected_attention(q, kc, vc, q_pos, cu, table, lens,
                                                          scale, config=cfg))
        except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
            rows.append({"config": cfg, "error": type(e).__name__})
            continue
        row = {"config": cfg, "ms": ms, "tflops": useful / ms / 1e9, "out": out}
        rows.append(row)
        if best is None or ms < best["ms"]:
            best = dict(row, out=out)
    # Dense-mask SDPA on the same selection (gathered contiguous K/V), and its error vs ours.
    pos_all = torch.arange(ctx, device="cuda")
    slots = slots_of(table, block_size, 0, pos_all)
    g = HQ // HKV  # expanded so the masked SDPA takes its memory-efficient kernel
    k = kc[slots // block_size, slots % block_size].transpose(0, 1)[None].repeat_interleave(g, 1)
    v = vc[slots // block_size, slots % block_size].transpose(0, 1)[None].repeat_interleave(g, 1)
    qq = q.transpose(0, 1)[None]
    mask = q_pos[:, None].long() >= pos_all[None, :]

    def dense():
        return F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale)

    dense_ms = bench(dense, rep=100)
    ref = dense()[0].transpose(0, 1).float()
    for row in rows:
        if "out" in row:
            row["rel_err"] = ((row.pop("out").float() - ref).norm() / ref.norm()).item()
    err = ((best["out"].float() - ref).norm() / ref.norm()).item()
    return {
        "ctx": ctx, "selected": nsel, "block_size": block_size,
        "useful_tflop": useful / 1e12,
        "best": {k2: v2 for k2, v2 in best.items() if k2 != "out"},
        "sweep": rows,
        "dense_mask_sdpa_ms": dense_ms, "dense_mask_sdpa_tflops": useful / dense_ms / 1e9,
        "rel_err_vs_dense_sdpa": err,
    }


def question_case(ctx: int, gen) -> dict:
    """64 question tokens over the whole context: few tiles, so split-KV decides the speed."""
    n = 64
    kc, vc, table = paged_cache([ctx + n], 16, HKV, D, DT, "cuda", spare_blocks=0, gen=gen)
    q = torch.randn(n, HQ, D, generator=gen).to(DT).cuda()
    q_pos = torch.arange(ctx, ctx + n, dtype=torch.int32, device="cuda")
    useful = 4.0 * D * HQ * float((q_pos.double() + 1).sum())
    res = {"ctx": ctx, "queries": n}
    for name, splits in (("no_split", 1), ("auto_split", None)):
        ms = bench(lambda s=splits: selected_attention(q, kc, vc, q_pos, [0, n], table, [ctx + n],
                                                       D**-0.5, num_splits=s))
        res[name] = {"ms": ms, "tflops": useful / ms / 1e9}
    return res


def sdpa_causal(ctx: int, gen) -> dict:
    q = torch.randn(1, HQ, ctx, D, generator=gen).to(DT).cuda()
    k = torch.randn(1, HKV, ctx, D, generator=gen).to(DT).cuda()
    v = torch.randn(1, HKV, ctx, D, generator=gen).to(DT).cuda()
    # Flash needs equal head counts: expand the KV heads (no copy of the math; same FLOPs).
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        ms = bench(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True), rep=100)
    flops = 4.0 * D * HQ * ctx * (ctx + 1) / 2
    return {"ctx": ctx, "ms": ms, "tflops": flops / ms / 1e9}


def memory_kernels(gen, copy_ref: float) -> list[dict]:
    out = []
    esz = 2
    ctx, bs = 32768, 16
    kc, vc, table = paged_cache([ctx], bs, HKV, D, DT, "cuda", spare_blocks=0, gen=gen)
    row_bytes = HKV * D * esz

    def add(name, n, nbytes, ms, extra=None):
        gbps = nbytes / ms / 1e6
        out.append({"kernel": name, "tokens": n, "bytes": nbytes, "ms": ms, "gbps": gbps,
                    "frac_of_copy": gbps / copy_ref, "frac_of_2930": gbps / 2930, **(extra or {})})

    all_slots = slots_of(table, bs, 0, torch.arange(ctx))
    kv = torch.randn(ctx, 2, HKV, D, generator=gen).to(DT).cuda()
    kn, vn = kv[:, 0], kv[:, 1]
    forced = torch.zeros(ctx, dtype=torch.bool, device="cuda")
    cu8 = [i * ctx // 8 for i in range(9)]  # 8 chunks = 8 "requests" of the selection
    take8 = [round(0.15 * (cu8[i + 1] - cu8[i])) for i in range(8)]
    for metric, ntensors in (("v_l2", 2), ("kv_l2", 4)):
        ms = bench(lambda m=metric: token_deviation(kn, vn, kc, vc, all_slots, m))
        add(f"deviation[{metric}]", ctx, ntensors * ctx * row_bytes + 4 * ctx, ms)
        dev = token_deviation(kn, vn, kc, vc, all_slots, metric)

        def chain(m=metric):
            d = token_deviation(kn, vn, kc, vc, all_slots, m)
            return hkvd_select(d, forced, [0, ctx], [round(0.15 * ctx)])

        ms_c = bench(chain)
        add(f"deviation[{metric}]+topk", ctx, ntensors * ctx * row_bytes + 4 * ctx, ms_c)
    ms_t = bench(lambda: hkvd_select(dev, forced, [0, ctx], [round(0.15 * ctx)]))
    # Device time of hkvd_select's own kernels (events above also count launch gaps).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            hkvd_select(dev, forced, cu8, take8)
        torch.cuda.synchronize()
    kernels_ms = sum(e.device_time_total for e in prof.key_averages()) / 1e3 / 10
    top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]
    ms_t8 = bench(lambda: hkvd_select(dev, forced, cu8, take8))
    out.append({"kernel": "hkvd_select alone (1 / 8 groups)", "tokens": ctx,
                "ms": ms_t, "ms_8_groups": ms_t8, "device_kernels_ms_8_groups": kernels_ms,
                "device_top": [(e.key[:60], e.device_time_total / 10e3) for e in top]})
    # Host-side cost of hkvd_select (python + launches), which events do not see.
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        hkvd_select(dev, forced, cu8, take8)
    host_ms = (time.perf_counter() - t) * 10
    torch.cuda.synchronize()
    out[-1]["host_ms_8_groups"] = host_ms

    delta = torch.randint(0, 32768, (ctx,), generator=gen).cuda()
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    cs = delta_cos_sin(inv.float().cuda(), 32768)
    for neox in (True, False):
        kk = kc.clone()
        ms = bench(lambda kk=kk, neox=neox: rerotate_k(kk, all_slots, delta, cs, neox))
        add(f"rerotate_k[{'neox' if neox else 'gptj'}]", ctx,
            2 * ctx * row_bytes + 16 * ctx, ms)  # K read + written; slots + delta
    for n in (round(0.15 * ctx), ctx):
        sl = all_slots[torch.randperm(ctx, generator=gen)[:n].sort().values.cuda()]
        ms = bench(lambda sl=sl, n=n: fuse_kv(kc, vc, sl, kn[:n], vn[:n]))
        add("fuse_kv", n, 4 * n * row_bytes + 8 * n, ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernels.json")
    ap.add_argument("--ctx", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--quick", action="store_true", help="first config only")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    configs = CONFIGS[:1] if args.quick else CONFIGS
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "shape": {"hq": HQ, "hkv": HKV, "d": D, "dtype": "bf16", "selected_frac": 0.15}}
    res["copy_gbps"] = copy_gbps()
    res["matmul_bf16_tflops"] = matmul_tflops()
    res["attention"] = []
    res["sdpa_causal_flash"] = []
    for ctx in args.ctx:
        for bs in (16, ctx):  # vLLM-style 16-token pages, and one contiguous block
            r = attention_case(ctx, 0.15, bs, configs, gen)
            res["attention"].append(r)
            print(f"attn ctx={ctx} bs={bs}: {r['best']}", flush=True)
        res["sdpa_causal_flash"].append(sdpa_causal(ctx, gen))
        res.setdefault("question", []).append(question_case(ctx, gen))
    res["memory"] = memory_kernels(gen, res["copy_gbps"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))

    print(f"\ndevice {res['device']}: copy {res['copy_gbps']:.0f} GB/s, "
          f"bf16 matmul {res['matmul_bf16_tflops']:.0f} TFLOP/s")
    print(f"{'attention':34s} {'ms':>8s} {'TFLOP/s':>8s}  config / note")
    for r in res["attention"]:
        b = r["best"]
        lay = "paged16" if r["block_size"] == 16 else "contig"
        print(f"  selected {r['ctx']:>5d} {lay:8s} sel={r['selected']:<5d} {b['ms']:8.3f} "
              f"{b['tflops']:8.1f}  {b['config']}  err={r['rel_err_vs_dense_sdpa']:.1e}")
        print(f"  dense-mask SDPA {r['ctx']:>5d} {lay:8s}       {r['dense_mask_sdpa_ms']:8.3f} "
              f"{r['dense_mask_sdpa_tflops']:8.1f}")
    for r in res["sdpa_causal_flash"]:
        print(f"  SDPA causal flash {r['ctx']:>5d} (full)     {r['ms']:8.3f} {r['tflops']:8.1f}")
    for r in res["question"]:
        for k in ("no_split", "auto_split"):
            print(f"  question 64 @ {r['ctx']:>5d} {k:10s}    {r[k]['ms']:8.3f} {r[k]['tflops']:8.1f}")
    print(f"{'memory-bound':34s} {'ms':>8s} {'GB/s':>8s}  of 2.93 TB/s")
    for r in res["memory"]:
        if "gbps" in r:
            print(f"  {r['kernel']:24s} n={r['tokens']:<6d} {r['ms']:8.4f} {r['gbps']:8.0f}  "
                  f"{r['frac_of_2930']:.0%}")
        else:
            print(f"  {r['kernel']:34s} {r['ms']:.4f} ms (8 groups {r['ms_8_groups']:.4f} ms, "
                  f"host {r['host_ms_8_groups']:.3f} ms, "
                  f"device kernels {r['device_kernels_ms_8_groups']:.4f} ms)")


if __name__ == "__main__":
    main()
