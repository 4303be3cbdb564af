"""What every benchmark sets up the same way: prose, model shapes, timing, metrics, the cache home.

A benchmark script is its own measurement over these: a new one takes its text, its
Llama-3-8B shape and its medians from here, so two benchmarks that claim the same setup
share it by construction. Run the scripts as modules from the repo root
(`python -m bench.NAME`); `blend` comes from wherever it is installed.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from blend.assets import home
from blend.prose import QUESTIONS, passages, topics

__all__ = ["LLAMA3_8B", "QUESTIONS", "ROOT", "child_env", "gbps", "home", "kl", "kv_chunk_shape",
           "median_s", "passages", "python_m", "rounded_median", "topic_words", "topics",
           "topk_kl"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout; `bench/results` lies under it

# Llama-3-8B's shape, for models made with random weights (speed does not depend on values).
LLAMA3_8B: dict = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=65536, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def kv_chunk_shape(tokens: int, shape: Mapping = LLAMA3_8B) -> tuple[int, int, int, int, int]:
    """A stored chunk's KV shape `[L, 2, n, Hkv, D]` for a model of `shape`."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return (shape["num_hidden_layers"], 2, tokens, shape["num_key_value_heads"], head_dim)


def topic_words(name: str, n: int | None = None) -> str:
    """The first `n` words of one topic (all of them for None), whitespace collapsed."""
    return " ".join(topics()[name].split()[:n])


def median_s(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `reps` calls after `warmup` untimed ones (host clock)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rounded_median(xs: Sequence[float], digits: int = 2) -> float | None:
    """Median for a results table (None for no samples)."""
    return round(statistics.median(xs), digits) if xs else None


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (10^9 bytes), two decimals."""
    return round(nbytes / seconds / 1e9, 2)


def kl(p_logits, q_logits) -> float:
    """Mean KL(p || q) over rows of two logit tensors."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def topk_kl(ref: Mapping[str, float], got: Mapping[str, float]) -> float:
    """KL(ref || got) of one position from two engines' top-k logprobs ({token: logprob}).

    The sum runs over `ref`'s top-k (the tail mass is negligible); a token missing from
    `got` gets `got`'s smallest returned logprob. The GPU engine test computes the same.
    """
    floor = min(got.values())
    return sum(math.exp(lp) * (lp - got.get(t, floor)) for t, lp in ref.items())


def python_m(module: str, *args: str) -> list[str]:
    """argv that runs `module` in a child Python with `-P`: the checkout's `blend/` folder
    (no `blend.patches` there) never stands in front of an installed `blend`. Start it with
    `child_env()`, which is where the child finds `bench`."""
    return [sys.executable, "-P", "-m", module, *args]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the checkout last on PYTHONPATH, for `python_m`."""
    out = dict(os.environ if env is None else env)
    parts = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in parts:
        parts.append(str(ROOT))
    out["PYTHONPATH"] = os.pathsep.join(parts)
    return out
