"""Chunk KV saved from a prompt's context vs computed standalone: which blends better?

The serving path saves a missed chunk's KV out of the prompt that first computed it
(vLLM's prefill or the blend), K rotated back to position 0, instead of computing the
chunk again on its own (CacheBlend's precompute). This measures what that costs or buys
in quality: each case's chunks are stored from a source prompt (another system prompt,
the chunks in another order, another question) and then blended into the target prompt;
KL(full || x) over the question tokens and top-1 agreement against the target's full
prefill, for full reuse (r=0) and blend (r=0.15), on held-out prose (seed 1; the
selection policies were tuned on seed 0).

Usage: python -m bench.context_kv [--n 20] [--model SmolLM2-135M-Instruct]
Writes bench/results/context_kv.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from bench.common import kl
from blend.prose import prose_prompts

RESULTS = Path(__file__).resolve().parent / "results"

SYSTEM_SRC = "You are a careful assistant. Read the documents."
SYSTEM_DST = "You are a helpful assistant. Answer the question using only the documents below."


def context_kv(hb, res, i: int) -> torch.Tensor:
    """Chunk `i` of a full prefill's cache, K rotated back to position 0 (as the connector
    saves it): `[L, 2, n, H, D]`."""
    from blend.kv import slots_for
    from blend.triton_kernels.placement import PlacePiece, extract_chunks_ref

    a = hb.adapter
    start, end = res.layout.spans[i]
    n = end - start
    out = torch.empty((a.num_layers, 2, n, a.num_kv_heads, a.head_dim), dtype=a.dtype)
    slots = slots_for(res.block_table, torch.arange(start, end), res.kv.block_size)
    layers = [res.kv.layer(layer) for layer in range(a.num_layers)]
    extract_chunks_ref(layers, [PlacePiece(out, 0, n, slots, start)], range(a.num_layers),
                       hb.blender.delta_table(end), a.rope.is_neox)
    return out


def run(hb, n: int, seed: int) -> dict:
    from blend.keys import chunk_key

    rng = random.Random(seed)
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, full, res) -> None:
        r = rows.setdefault(name, {"kl": [], "top1": []})
        r["kl"].append(kl(full.logits, res.logits))
        r["top1"].append(float((full.logits.argmax(-1) == res.logits.argmax(-1)).float().mean()))

    for passages, q in prose_prompts(n, seed):
        order = list(range(len(passages)))
        while order == sorted(order):
            rng.shuffle(order)
        dst = [passages[j] for j in order]
        full = hb.prefill(SYSTEM_DST, dst, q, "full")
        for source in ("standalone", "context"):
            hb._memory.clear()
            if source == "context":
                src = hb.prefill(SYSTEM_SRC, passages, "Which document is the longest?", "full")
                for i, ids in enumerate(src.layout.chunks):
                    hb._memory[chunk_key(hb.fingerprint, ids)] = context_kv(hb, src, i)
            add(f"{source} reuse r=0", full, hb.prefill(SYSTEM_DST, dst, q, "reuse"))
            add(f"{source} blend r=0.15", full, hb.prefill(SYSTEM_DST, dst, q, "blend"))
    return {name: {"kl": statistics.mean(v["kl"]), "kl_median": statistics.median(v["kl"]),
                   "top1": statistics.mean(v["top1"]), "n": len(v["kl"])}
            for name, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", default=str(RESULTS / "context_kv.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blend.assets import model_path
    from blend.offline import HFBlender

    path = str(model_path(args.model))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hb = HFBlender(model, AutoTokenizer.from_pretrained(path),
                   cache_fuse_metadata={"recomp_ratio": 0.15})
    rows = run(hb, args.n, args.seed)
    print(f"{args.model}, fp32, {args.n} held-out prose prompts (seed {args.seed})")
    print(f"{'row':28s} {'KL':>8s} {'median':>8s} {'top-1':>6s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['kl']:8.4f} {r['kl_median']:8.4f} {r['top1']:6.3f}")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc[args.model] = {"n": args.n, "seed": args.seed, "split": "heldout", "dtype": "float32",
                       "rows": rows}
    out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
