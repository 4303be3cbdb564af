"""TTFT on the GPU: full prefill vs blended prefill -> bench/results/ttft_gpu.json.

A Llama-3-8B-shaped `transformers` model with random bf16 weights (speed does
not depend on the values). Prompt: 8 chunks + a 64-token question, at 8k and
32k context tokens.

* full:    `model(ids, use_cache=False, logits_to_keep=1)` with SDPA (flash,
           causal); no cache is written, so the baseline is, if anything, fast.
* blended: the engine's `Blender` at r=0.15 with one check layer (1), Triton
           ops, then the question prefilled over the fused cache (as vLLM
           does); TTFT ends when the question's logits exist. Chunk KV starts
           in pinned host memory and is placed by the connector's own loader
           (`blend.chunk_loader.LayerLoad`: copies on a side stream, layer l's
           placement waits only for copy l), so the timing includes the
           product's load path.
Medians over repeats, host clock around synchronized regions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import LLAMA3_8B, ROOT
from blend.blender import Blender, BlendSeq
from blend.chunk_loader import LayerLoad, Piece, source_for
from blend.config import BlendConfig
from blend.kv import PagedKV, slots_for
from blend.models import adapter_for

QUESTION = 64
CHUNKS = 8


def llama3_8b(layers: int, tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:  # CPU smoke run of this script
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                          max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def chunk_load(blender: Blender, kv: PagedKV, host_chunks: list[torch.Tensor],
               slots: torch.Tensor, clen: int) -> LayerLoad:
    """The connector's loader over this run's chunks: chunk `i` goes to context tokens
    `[i * clen, (i + 1) * clen)`, moved by `i * clen` positions (a fresh load per run,
    as the connector builds one per blend)."""
    dev = torch.device(blender.adapter.device)
    pieces = []
    for i, host in enumerate(host_chunks):
        src, _ = source_for(f"chunk{i}", host, dev, None, False)
        pieces.append(Piece(src, 0, clen, slots[i * clen:(i + 1) * clen], i * clen))
    return LayerLoad(blender, kv, pieces)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def run_context(model, ctx: int, block_size: int | None, reps: int, device: str,
                profile_dir: Path | None, chunks: int = CHUNKS, graphs: bool = False) -> dict:
    a = adapter_for(model)
    blender = Blender(a, BlendConfig(recomp_ratio=0.15, check_layers=(1,),
                                     attention_backend="triton" if device == "cuda" else "torch"))
    gen = torch.Generator().manual_seed(ctx)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (ctx + QUESTION,), generator=gen)
    total = ctx + QUESTION
    bs = block_size or total  # None: one contiguous block
    kv = PagedKV.like(a, total, bs)
    row = kv.allocate(total)
    slots = slots_for(row, torch.arange(ctx), bs)  # host int64, as the connector plans them
    clen = ctx // chunks  # the same context in more, shorter chunks: what grows per chunk
    shape = (a.num_layers, 2, clen, a.num_kv_heads, a.head_dim)
    host_chunks = []
    for _ in range(chunks):
        h = torch.empty(shape, dtype=a.dtype, pin_memory=device == "cuda")
        h.copy_(torch.randn(shape, dtype=torch.float32, generator=gen).to(a.dtype)
                if device != "cuda" else torch.randn(shape, device=device, dtype=a.dtype).cpu())
        host_chunks.append(h)
    chunk_bytes = sum(h.numel() * h.element_size() for h in host_chunks)

    def new_load() -> LayerLoad:
        return chunk_load(blender, kv, host_chunks, slots, clen)
    ctx_ids, q_ids = ids[:ctx], ids[ctx:]
    input_ids = ids[None].to(device)

    def full():
        return model(input_ids, use_cache=False, logits_to_keep=1).logits

    def blended(b=blender):
        # The question rides in the blend pass as forced output tokens (exact, by causality).
        load = chunk_load(b, kv, host_chunks, slots, clen)
        out = b.run([BlendSeq(ids, 0, row, num_outputs=QUESTION)], kv, blend=True,
                    layer_hook=load.hook).logits
        load.finish(None)
        return out

    def load_only():
        load = new_load()
        for layer in range(a.num_layers):
            load.hook(layer)

    def copy_only():
        load = new_load()
        load.finish(None)  # queues every copy, places nothing
        if load.stream is not None:
            load.stream.synchronize()

    def blend_two_pass():
        # The question as a second plain-prefill pass over the fused cache (the vLLM shape).
        load = new_load()
        blender.run([BlendSeq(ctx_ids, 0, row)], kv, blend=True, layer_hook=load.hook)
        return blender.run([BlendSeq(q_ids, ctx, row, num_outputs=QUESTION)], kv,
                           blend=False).logits

    def blend_ctx_only():
        load = new_load()
        blender.run([BlendSeq(ctx_ids, 0, row)], kv, blend=True, layer_hook=load.hook)

    t_full = timed(full, device, reps)
    t_ctx = timed(blend_ctx_only, device, reps)
    t_two = timed(blend_two_pass, device, reps)
    t_blend = timed(blended, device, reps)
    t_load = timed(load_only, device, reps)
    t_copy = timed(copy_only, device, reps)
    # Host side: how long the blend takes to enqueue (GPU-bound if well under blend_ms), and
    # which calls synchronize the device (CUDA sync debug mode, first call site per message).
    sync(device)
    t = time.perf_counter()
    blended()
    host_ms = (time.perf_counter() - t) * 1e3
    sync(device)
    syncs = []
    if device == "cuda":
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                blended()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught})
    # Master invariant on the GPU: ratio 1.0 reproduces full prefill (last-token logits).
    r1 = blender.with_config(BlendConfig(recomp_ratio=1.0, check_layers=(1,),
                                         attention_backend=blender.config.attention_backend))
    ref = full()[0, -1].float()
    got = blended(r1)[-1].float()
    inv_err = ((got - ref).norm() / ref.norm()).item()
    extra = graph_rows(blender, kv, int(row.numel()), blended, reps, device) if graphs else {}
    res = {
        "ctx": ctx, "question": QUESTION, "chunks": chunks, **extra,
        "layout": "paged16" if block_size == 16 else ("contiguous" if block_size is None
                                                      else f"paged{block_size}"),
        "full_ms": statistics.median(t_full), "blend_ms": statistics.median(t_blend),
        "speedup": statistics.median(t_full) / statistics.median(t_blend),
        "blend_context_only_ms": statistics.median(t_ctx),
        "two_pass_ms": statistics.median(t_two),
        "two_pass_speedup": statistics.median(t_full) / statistics.median(t_two),
        "host_enqueue_ms": host_ms, "sync_sites": syncs,
        "load_plus_fuse_rerotate_ms": statistics.median(t_load),
        "h2d_copy_ms": statistics.median(t_copy),
        "h2d_gbps": chunk_bytes / statistics.median(t_copy) / 1e6,
        "chunk_kv_bytes": chunk_bytes,
        "ratio1_vs_full_last_logits_rel_err": inv_err,
        "raw_ms": {"full": t_full, "blend": t_blend, "ctx": t_ctx, "two_pass": t_two, "load": t_load, "copy": t_copy},
    }
    if profile_dir is not None:  # where the blend's host time goes (it bounds TTFT at 8k)
        import cProfile
        import io
        import pstats

        sync(device)
        pr = cProfile.Profile()
        pr.enable()
        blended()
        pr.disable()
        sync(device)
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        (profile_dir / f"host_profile_{ctx}_{chunks}.txt").write_text(buf.getvalue())
    if profile_dir is not None and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            blended()
            sync(device)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        (profile_dir / f"ttft_profile_{ctx}_{chunks}_{res['layout']}.txt").write_text(table)
        res["profile_top"] = [
            {"name": e.key[:80], "cuda_ms": e.device_time_total / 1e3, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]]
    return res


def graph_rows(blender: Blender, kv: PagedKV, max_blocks: int, blended, reps: int,
               device: str) -> dict:
    """The same blend with the steady layers as CUDA graphs (`cuda_graphs`), interleaved
    with the eager one: times, host enqueue and how far its logits are from eager's."""
    from dataclasses import replace

    g = blender.with_config(replace(blender.config, cuda_graphs=True))
    graphs = g.use_graphs(kv, max_blocks)
    if graphs is None:
        return {"graphs": {"skipped": f"backend {g.ops.name}: graphs need triton"}}
    graphs.capture_all()
    eager_logits, graph_logits = blended().float(), blended(g).float()
    t_eager, t_graph = [], []
    for _ in range(reps):  # interleaved: the host's speed drifts between calls
        t_eager += timed(blended, device, 1, warmup=0)
        t_graph += timed(lambda: blended(g), device, 1, warmup=0)
    sync(device)
    t = time.perf_counter()
    blended(g)
    host_ms = (time.perf_counter() - t) * 1e3
    sync(device)
    return {"graphs": {
        "eager_ms": statistics.median(t_eager), "graphs_ms": statistics.median(t_graph),
        "gain": statistics.median(t_eager) / statistics.median(t_graph),
        "host_enqueue_ms": host_ms, "replays": graphs.replays,
        "vs_eager_logits_rel_err": ((graph_logits - eager_logits).norm()
                                    / eager_logits.norm()).item(),
        "raw_ms": {"eager": t_eager, "graphs": t_graph}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ttft_gpu.json"))
    ap.add_argument("--ctx", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--layouts", nargs="*", default=["contiguous", "paged16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a toy model")
    ap.add_argument("--profile-dir", default=None)
    ap.add_argument("--chunks", type=int, nargs="*", default=[CHUNKS],
                    help="chunk counts per context (issue 23: 8 vs 16 and 32 at equal context)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time the blend with its steady layers as CUDA graphs")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    model = llama3_8b(args.layers, args.tiny, device)
    prof = Path(args.profile_dir) if args.profile_dir else None
    results = []
    with torch.inference_mode():
        for ctx in args.ctx:
            for lay, n in itertools.product(args.layouts, args.chunks):
                r = run_context(model, ctx, None if lay == "contiguous" else int(lay[5:]),
                                args.reps, device, prof, n, args.cuda_graphs)
                results.append(r)
                print(f"ctx {ctx:>6d} x{n:<3d} {r['layout']:10s} full {r['full_ms']:8.1f} ms  "
                      f"blend {r['blend_ms']:7.1f} ms  speedup {r['speedup']:.2f}x  "
                      f"load(h2d) {r['h2d_copy_ms']:.1f} ms ({r['h2d_gbps']:.0f} GB/s)  "
                      f"load+fuse+rot {r['load_plus_fuse_rerotate_ms']:.1f} ms  "
                      f"r=1 err {r['ratio1_vs_full_last_logits_rel_err']:.1e}  "
                      f"ctx-only {r['blend_context_only_ms']:.1f} ms  host {r['host_enqueue_ms']:.1f} ms"
                      f"  two-pass {r['two_pass_ms']:.1f} ms ({r['two_pass_speedup']:.2f}x)"
                      f"  syncs {len(r['sync_sites'])}", flush=True)
                for site in r["sync_sites"]:
                    print("   sync:", site)
                if "graphs_ms" in r.get("graphs", {}):
                    g = r["graphs"]
                    print(f"   graphs: eager {g['eager_ms']:.1f} ms, graphs {g['graphs_ms']:.1f} ms "
                          f"({g['gain']:.2f}x), host {g['host_enqueue_ms']:.1f} ms, "
                          f"vs eager {g['vs_eager_logits_rel_err']:.1e}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "model": "Llama-3-8B shape, random bf16 weights",
            "recomp_ratio": 0.15, "check_layers": [1], "layers": args.layers}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
