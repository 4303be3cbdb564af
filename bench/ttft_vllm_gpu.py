"""TTFT inside GPU vLLM: plain prefill vs CacheBlend, Llama-3-8B shape, random bf16 weights.

Issue 11's benchmark, run on the lent H200 (`bash tools/gpu/device.sh bench`, docs/gpu.md):

- Model: Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
  14336, vocab 128256, rope_theta 500000) with random bf16 weights, made on the GPU with
  `transformers` and saved as safetensors (once per machine), with SmolLM2's tokenizer
  (every token id we send is < its vocab of 49152).
- Prompts: a system prompt, 8 chunks of real prose (Python's language reference) and a
  64-token question; 8k and 32k contexts. Every run has a fresh system prompt (so vLLM's
  prefix cache, on as by default, cannot serve plain vLLM the context), the chunks in a
  new order and a fresh question; the chunks are precomputed with `blend.precompute`.
- Engines: one process each, all alive together and driven interleaved: `plain` (vLLM, no
  connector), `host` (store with `gpu_bytes: 0`: chunk KV from the pinned host tier) and
  `gpu` (store with a GPU tier, `gpu_bytes: 16GiB`). vLLM defaults otherwise (torch.compile,
  CUDA graphs, prefix caching, chunked prefill); max_model_len 40000.
- TTFT = wall time of a 1-token `generate`, median of `--runs` interleaved runs after
  `--warmup` runs. `concurrent`: 16 requests at once over a shared pool of 24 chunks (8 per
  request), prompt tokens per second. `cheap` rows: the host engine under the cheap selection
  (`CHEAP`, per request), interleaved with the others. `breakdown`: a fourth engine (host
  tier) with `trace_dir` set, started after the others are gone; medians of the traces'
  `timings_ms`: `to_worker` (generate() to the worker's start_load_kv: scheduling and the
  hop to the worker), `prep` (store fetch, planning, queueing the copies), `blend` and `load`
  (GPU-event spans), `host` (the blend's host time); `after_blend_ms` is the rest of TTFT
  (vLLM's question step, sampling, the way back).

    python bench/ttft_vllm_gpu.py [--runs 5] [--warmup 2] [--out bench/results/ttft_vllm_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARK = "@@BENCH "
SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
             max_position_embeddings=65536, rms_norm_eps=1e-5, tie_word_embeddings=False)
MAX_MODEL_LEN = 40000
N_CHUNKS = 8
QUESTION_TOKENS = 64
POOL_CHUNKS, POOL_CHUNK_TOKENS, CONCURRENT = 24, 512, 16
TARGETS = {"8k_host": 4.0, "32k_host": 5.0, "32k_cheap": 8.0}
# Issue 13's cheap mode as measured on the prose prompts (compute 0.071): no full-token check
# layer; the question's attention at layer 4 over the cached KV picks 4.5% of the context.
CHEAP = {"selection": "cheap", "check_layers": [4], "recomp_ratio": 0.045, "sink_tokens": 4}


def home() -> Path:
    return Path(os.environ.get("CACHEBLEND_HOME", "~/.cache/cacheblend")).expanduser()


# ----------------------------------------------------------------- model
def make_model(out: Path, tok_src: Path) -> None:
    """Random Llama-3-8B-shaped bf16 weights, made on the GPU, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = LlamaConfig(**SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.config.dtype = "bfloat16"
    # Greedy answers stay inside the tokenizer's vocab (49152 of 128256), so detokenizing never
    # meets an id the tokenizer lacks: those lm_head rows give logit 0, below the random max.
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = 0
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    for f in tok_src.iterdir():  # tokenizer files only
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(f, tmp / f.name)
    (tmp / "DONE").write_text(json.dumps(SHAPE))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def ensure_model(tok_src: Path) -> Path:
    out = home() / "models" / "llama3-8b-shape-random"
    if (out / "DONE").exists() and json.loads((out / "DONE").read_text()) == SHAPE:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    subprocess.run([sys.executable, "-P", __file__, "--make-model", str(out), str(tok_src)],
                   check=True)
    print(f"[bench] random model made in {time.time() - t:.0f} s: {out}", flush=True)
    return out


# ----------------------------------------------------------------- worker (one engine)
def worker(kind: str, model: str, store: str | None, trace_dir: str | None, util: float,
           ratio: float, max_model_len: int, eager: bool = False) -> None:
    """Serve commands (JSON lines on stdin), answer on stdout lines prefixed with MARK."""
    from vllm import LLM, SamplingParams

    import blend

    kw = dict(dtype="bfloat16", max_model_len=max_model_len, gpu_memory_utilization=util, seed=0)
    if eager:
        kw["enforce_eager"] = True
    if kind != "plain":
        extra = {"trace_dir": trace_dir} if trace_dir else {}
        kw["kv_transfer_config"] = blend.kv_transfer_config(
            store=json.loads(store), cache_fuse_metadata={"recomp_ratio": ratio}, **extra)
    t = time.time()
    llm = LLM(model=model, **kw)
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def say(**msg):
        sys.stdout.write(MARK + json.dumps(msg) + "\n")
        sys.stdout.flush()

    def prompt(ids, spans, meta=None):
        if kind == "plain":
            return {"prompt_token_ids": ids}
        return blend.BlendPrompt(ids, spans, cache_fuse_metadata=meta)

    say(op="ready", start_s=round(time.time() - t, 1))
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":  # stop the engine, then leave without interpreter teardown
            llm.llm_engine.engine_core.shutdown()
            say(op="bye")
            sys.stderr.flush()
            os._exit(0)
        if op == "precompute":
            t = time.perf_counter()
            n = blend.precompute(llm, cmd["chunks"]) if kind != "plain" else {}
            say(op=op, s=round(time.perf_counter() - t, 2), **n)
        elif op == "run":  # one or more prompts in one generate call
            ps = [prompt(ids, spans, cmd.get("meta")) for ids, spans in cmd["prompts"]]
            t_unix = time.time()
            t = time.perf_counter()
            outs = llm.generate(ps, sp, use_tqdm=False)
            ms = (time.perf_counter() - t) * 1e3
            reps = [(o.kv_transfer_params or {}).get("blend") or {} for o in outs]
            say(op=op, ms=ms, call_unix_ms=t_unix * 1e3, request_ids=[o.request_id for o in outs],
                cached=[o.num_cached_tokens or 0 for o in outs],  # vLLM's + the connector's
                local=[r.get("num_local", 0) for r in reps],  # vLLM's prefix cache alone
                hit=[r.get("chunk_hit_tokens", 0) / max(1, r.get("chunk_tokens", 0))
                     for r in reps], reports=len([r for r in reps if r]))


class Engine:
    """A worker process and the pipe we drive it through."""

    def __init__(self, kind: str, model: Path, log, store: dict | None = None,
                 trace_dir: str | None = None, util: float = 0.27, ratio: float = 0.15,
                 max_model_len: int = MAX_MODEL_LEN, eager: bool = False):
        self.kind, self.log, self.replies = kind, log, queue.Queue()
        cmd = [sys.executable, "-P", __file__, "--worker", kind, str(model),
               json.dumps(store) if store else "", trace_dir or "", str(util), str(ratio),
               str(max_model_len), "eager" if eager else ""]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._drain, daemon=True).start()
        self.ready = self.wait(900)
        print(f"[bench] {kind} engine ready in {self.ready['start_s']} s", flush=True)

    def _drain(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
            else:
                self.log.write(f"[{self.kind}] {line}")
        self.replies.put(None)

    def wait(self, timeout: float = 600) -> dict:
        msg = self.replies.get(timeout=timeout)
        if msg is None:
            raise RuntimeError(f"{self.kind} worker died (rc {self.proc.wait()}); see the log")
        return msg

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.wait()

    def close(self):
        try:
            self.call(op="quit")
            self.proc.wait(120)
        except Exception:  # noqa: BLE001 - a dead or stuck worker is killed
            self.proc.kill()


# ----------------------------------------------------------------- prompts
class Prompts:
    """Chunks of real prose (fixed token ids), fresh system prompts and questions."""

    def __init__(self, tok, seed: int = 0):
        from pydoc_data.topics import topics

        self.tok, self.rng = tok, random.Random(seed)
        text = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
        self.stream = tok(text, add_special_tokens=False).input_ids
        self.words = text.split()
        self.at, self.doc = 0, 0

    def chunks(self, n: int, tokens: int) -> list[str]:
        out = []
        for _ in range(n):
            if self.at + tokens > len(self.stream):
                self.at = 0  # reuse the prose; the document tag keeps chunk keys distinct
            body = self.tok.decode(self.stream[self.at:self.at + tokens - 8])
            self.at += tokens - 8
            self.doc += 1
            out.append(f"[Document {self.doc}] {body}")
        return out

    def _words(self, n: int) -> str:
        i = self.rng.randrange(len(self.words) - n)
        return " ".join(self.words[i:i + n])

    def build(self, chunks: list[str]):
        import blend

        system = f"Session {self.rng.randrange(10**9)}: {self._words(6)}. Answer from the documents."
        q_ids = self.tok(self._words(80), add_special_tokens=False).input_ids[:QUESTION_TOKENS - 8]
        order = chunks[:]
        self.rng.shuffle(order)
        p = blend.build_prompt(self.tok, system, order, self.tok.decode(q_ids))
        return p.prompt_token_ids, [list(s) for s in p.spans]


# ----------------------------------------------------------------- driver
def med(xs):
    return round(statistics.median(xs), 2) if xs else None


def trace_timings(trace_dir: Path, request_ids: list[str]) -> dict[str, float]:
    """Sum of `timings_ms` over the trace files of these requests (absent keys: absent)."""
    tot: dict[str, float] = {}
    for p in trace_dir.glob("*.json"):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rid = str(doc.get("req_id", p.stem))
        if not any(rid == r or rid.startswith(r + "-") for r in request_ids):  # core id = id-suffix
            continue
        for k, v in (doc.get("timings_ms") or {}).items():
            if isinstance(v, (int, float)):
                tot[k] = tot.get(k, 0.0) + float(v)
    return tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--util", type=float, default=0.27, help="gpu_memory_utilization per engine")
    ap.add_argument("--gpu-bytes", default="16GiB")
    ap.add_argument("--host-bytes", default="12GiB")
    ap.add_argument("--concurrent-reps", type=int, default=3)
    ap.add_argument("--breakdown", choices=("separate", "none"), default="separate")
    ap.add_argument("--no-cheap", dest="cheap", action="store_false",
                    help="leave out the cheap-selection rows")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="skip the breakdown engine if this much time has passed")
    ap.add_argument("--model", default=None,
                    help="an existing HF folder instead of the random 8B (smoke tests)")
    ap.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    ap.add_argument("--concurrent", type=int, default=CONCURRENT)
    ap.add_argument("--pool-chunk-tokens", type=int, default=POOL_CHUNK_TOKENS)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="smoke tests on a CPU only: the measurement keeps vLLM's defaults")
    ap.add_argument("--log", default=None, help="worker logs (default: next to --out)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ttft_vllm_gpu.json"))
    args = ap.parse_args()
    t_all = time.time()

    from transformers import AutoTokenizer

    from blend.assets import model_path

    tok_src = model_path()
    model = Path(args.model) if args.model else ensure_model(tok_src)
    tok = AutoTokenizer.from_pretrained(model)
    P = Prompts(tok)
    contexts = [int(c) for c in args.contexts.split(",")]
    sets = {n: P.chunks(N_CHUNKS, n // N_CHUNKS - 8) for n in contexts}  # room for prefix
    pool = P.chunks(POOL_CHUNKS, args.pool_chunk_tokens)
    all_chunks = [c for n in contexts for c in sets[n]] + pool

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log or out_path.with_suffix(".workers.log"), "w", buffering=1)
    work = Path(tempfile.mkdtemp(prefix="cacheblend-ttft-gpu-"))
    stores = {
        "host": {"backend": "local", "path": str(work / "kv_host"), "memory_bytes": args.host_bytes,
                 "gpu_bytes": 0},
        "gpu": {"backend": "local", "path": str(work / "kv_gpu"), "memory_bytes": args.host_bytes,
                "gpu_bytes": args.gpu_bytes},
    }
    ekw = dict(util=args.util, ratio=args.ratio, max_model_len=args.max_model_len,
               eager=args.enforce_eager)
    engines = {"plain": Engine("plain", model, log, **ekw)}
    for tier in ("host", "gpu"):
        engines[tier] = Engine(tier, model, log, store=stores[tier], **ekw)
        pre = engines[tier].call(op="precompute", chunks=all_chunks)
        print(f"[bench] {tier}: precomputed {pre}", flush=True)

    # Each run, interleaved: plain, the host tier, the GPU tier, and the host tier's engine
    # under the cheap selection (a per-request cache_fuse_metadata; its own prefix-cache salt).
    variants = {k: (k, None) for k in engines}
    if args.cheap:
        variants["cheap"] = ("host", CHEAP)
    rows, raw = [], {}
    for n in contexts:
        times = {k: [] for k in variants}
        hits = {k: [] for k in variants}
        for i in range(args.warmup + args.runs):
            ids, spans = P.build(sets[n])
            for k, (ek, meta) in variants.items():
                r = engines[ek].call(op="run", prompts=[[ids, spans]], meta=meta)
                if k != "plain" and (not r["reports"] or r["local"][0] >= spans[-1][1] - 16):
                    print(f"[bench] warning: {k} run {i}: reports={r['reports']} "
                          f"prefix-cached={r['local']}")
                if i >= args.warmup:
                    times[k].append(r["ms"])
                    hits[k].append(r["hit"][0])
        raw[n] = {"times_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
                  "prompt_tokens": len(ids), "context_tokens": spans[-1][1]}
        for k, (tier, meta) in variants.items():
            if k == "plain":
                continue
            pm, bm = med(times["plain"]), med(times[k])
            cfm = {"recomp_ratio": args.ratio, **(meta or {})}
            rows.append({"context_tokens": spans[-1][1], "prompt_tokens": len(ids), "tier": tier,
                         "selection": cfm.get("selection", "deviation"), "cache_fuse_metadata": cfm,
                         "plain_ms": pm, "blend_ms": bm, "speedup": round(pm / bm, 2),
                         "plain_runs_ms": raw[n]["times_ms"]["plain"],
                         "blend_runs_ms": raw[n]["times_ms"][k],
                         "chunk_hit_rate": min(hits[k])})

    conc = {"requests": args.concurrent, "pool_chunks": POOL_CHUNKS,
            "chunks_per_request": N_CHUNKS, "chunk_tokens": args.pool_chunk_tokens,
            "reps": args.concurrent_reps}
    rate = {k: [] for k in engines}
    for i in range(1 + args.concurrent_reps):
        batch = [P.build(P.rng.sample(pool, N_CHUNKS)) for _ in range(args.concurrent)]
        toks = sum(len(ids) for ids, _ in batch)
        for k, e in engines.items():
            r = e.call(op="run", prompts=batch)
            if i > 0:
                rate[k].append(toks / (r["ms"] / 1e3))
        conc["prompt_tokens"] = toks
    for k in engines:
        conc[f"{k}_tok_s"] = round(statistics.median(rate[k]))
    for tier in ("host", "gpu"):
        conc[f"speedup_{tier}"] = round(conc[f"{tier}_tok_s"] / conc["plain_tok_s"], 2)
    for e in engines.values():
        e.close()

    breakdown: dict = {"source": "trace_dir timings_ms (medians per request)", "tier": "host"}
    if args.breakdown == "none":
        breakdown["skipped"] = "--breakdown none"
    elif time.time() - t_all > args.budget_s:
        breakdown["skipped"] = f"time budget ({args.budget_s} s) spent before the trace engine"
    else:
        tdir = work / "trace"
        tdir.mkdir()
        e = Engine("host", model, log, store={**stores["host"], "path": str(work / "kv_trace")},
                   trace_dir=str(tdir), **ekw)
        e.call(op="precompute", chunks=all_chunks)
        for n in contexts:
            per, ttft = [], []
            for i in range(1 + 3):
                for f in tdir.glob("*.json"):
                    f.unlink()
                ids, spans = P.build(sets[n])
                r = e.call(op="run", prompts=[[ids, spans]])
                if i:
                    d = trace_timings(tdir, r["request_ids"])
                    if "start_unix_ms" in d:  # the worker's clock is this machine's clock
                        d["to_worker"] = d.pop("start_unix_ms") - r["call_unix_ms"]
                    per.append(d)
                    ttft.append(r["ms"])
            keys = sorted({k for d in per for k in d if "." not in k})  # not per layer
            tm = {k: med([d[k] for d in per if k in d]) for k in keys}
            entry = {"ttft_ms_traced": med(ttft), "timings_ms": tm, "runs": len(per)}
            if "step" in tm:
                entry["rest_of_step_ms"] = round(tm["step"] - tm.get("load", 0) - tm.get("blend", 0), 2)
            if "blend" in tm:  # GPU time of the blend (its layer copies overlap it)
                entry["ttft_minus_blend_ms"] = round(entry["ttft_ms_traced"] - tm["blend"], 2)
                if "to_worker" in tm and "prep" in tm:  # what is left: vLLM's question step
                    entry["after_blend_ms"] = round(entry["ttft_ms_traced"] - tm["to_worker"]
                                                    - tm["prep"] - tm["blend"], 2)
            breakdown[str(raw[n]["context_tokens"])] = entry
        e.close()

    import vllm

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = "cpu (no nvidia-smi)"
    res = {
        "what": "TTFT (1-token generate wall time) inside GPU vLLM: plain prefill vs CacheBlend",
        "device": gpu, "vllm": vllm.__version__,
        "model": (args.model or "Llama-3-8B shape, random bf16 weights (transformers), "
                  "SmolLM2 tokenizer"),
        "recomp_ratio": args.ratio, "runs": args.runs, "warmup": args.warmup,
        "engine": {"max_model_len": args.max_model_len, "gpu_memory_utilization": args.util,
                   "defaults": "torch.compile + CUDA graphs, prefix caching, chunked prefill"},
        "stores": {k: {kk: v for kk, v in s.items() if kk != "path"} for k, s in stores.items()},
        "rows": rows, "concurrent": conc, "breakdown": breakdown, "targets": TARGETS,
        "seconds": round(time.time() - t_all, 1),
    }
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'context':>8} {'tier':>5} {'plain ms':>9} {'blend ms':>9} {'speedup':>8} {'hit':>5}")
    for r in rows:
        print(f"{r['context_tokens']:>8} {r['tier']:>5} {r['plain_ms']:>9} {r['blend_ms']:>9} "
              f"{r['speedup']:>8} {r['chunk_hit_rate']:>5.2f}")
    print(f"concurrent ({args.concurrent} requests, {conc['prompt_tokens']} prompt tokens): plain "
          f"{conc['plain_tok_s']} tok/s, host {conc['host_tok_s']} ({conc['speedup_host']}x), "
          f"gpu {conc['gpu_tok_s']} ({conc['speedup_gpu']}x)")
    print("breakdown:", json.dumps(breakdown))
    print(f"total {res['seconds']} s -> {out_path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--make-model":
        make_model(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, model, store, tdir, util, ratio, mml, eager = sys.argv[2:10]
        worker(kind, model, store or None, tdir or None, float(util), float(ratio), int(mml),
               eager == "eager")
    else:
        main()
