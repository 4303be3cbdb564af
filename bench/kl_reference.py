"""CPU reference for the GPU suite's reuse-quality check (tests/test_vllm_gpu.py::test_b_*).

The GPU test asks: with chunks stored by a first pass and reused in another order and
position, is the first-answer-token KL of blended vLLM to plain vLLM within 10% of what
the CPU engine gives *on the same prompts*? This script computes the CPU figure with
vLLM CPU (0.32) and writes it, with the prompts themselves (texts, token ids, spans), to
`bench/results/kl_reference.json`; the GPU test replays exactly those token ids.

Settings are the GPU test's: SmolLM2-135M-Instruct bf16, vLLM defaults (prefix caching
and chunked prefill on), recomp_ratio 0.15 with the default check layers, a local store
in a fresh directory, first answer token with `SamplingParams(logprobs=20)` (vLLM's
default `max_logprobs`). Only `enforce_eager` differs from the GPU run: torch.compile on a
2-core CPU costs minutes and does not change the math the comparison is about.
On a CPU with AMX, vLLM CPU 0.32 stores bf16 KV in AMX's tiled layout, which is not a
strided view, and the connector refuses it (`UnsupportedLayoutError`). CPU_ATTN takes only
blocks of 32k, so the block size cannot steer it; instead this script hides AMX from vLLM's
ISA choice (`torch.cpu._is_amx_tile_supported`, through a `sitecustomize` on PYTHONPATH so
that vLLM's spawned engine processes get it too), which gives the strided 'vec' layout:
the same attention, another kernel.

    python -m bench.kl_reference [--out bench/results/kl_reference.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import QUESTIONS, ROOT, passages, topk_kl

N_PROMPTS = 12
LOGPROBS = 20
RATIO = 0.15
SYS_SRC = "You are a helpful assistant."
SYS_REUSE = "Answer briefly, using only the documents below."


def cases(tok) -> dict:
    """Reuse prompts: each stored by a source prompt (chunks 0..3), reused as 2,0,3,1."""
    from blend.api import build_prompt

    P = passages(4 * N_PROMPTS, 700)
    out = {"reuse_src": [], "reuse": []}
    for i in range(N_PROMPTS):
        c = P[4 * i: 4 * i + 4]
        src = (SYS_SRC, c, QUESTIONS[i % len(QUESTIONS)])
        reuse = (SYS_REUSE, [c[2], c[0], c[3], c[1]], QUESTIONS[(i + 1) % len(QUESTIONS)])
        for key, (s, ch, q) in (("reuse_src", src), ("reuse", reuse)):
            p = build_prompt(tok, s, ch, q)
            out[key].append({"system": s, "chunks": ch, "question": q,
                             "ids": p.prompt_token_ids, "spans": [list(x) for x in p.spans]})
    return out


def first_token_row(out) -> dict[str, float]:
    """The first answer token's top-k distribution as {token id: logprob}."""
    return {str(t): lp.logprob for t, lp in out.outputs[0].logprobs[0].items() if t >= 0}


def kl_rows(ref: list[dict], got: list[dict]) -> list[float]:
    return [topk_kl(r, g) for r, g in zip(ref, got)]


def dumps(res: dict) -> str:
    """JSON with one line per prompt (token ids and texts stay readable in a diff)."""
    head = json.dumps({k: v for k, v in res.items() if k != "cases"}, indent=1)
    cases = ",\n".join(f'  "{k}": [\n' + ",\n".join("   " + json.dumps(c) for c in v) + "\n  ]"
                        for k, v in res["cases"].items())
    return head[:-2] + ',\n "cases": {\n' + cases + "\n }\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kl_reference.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    hide_amx = "import torch\ntorch.cpu._is_amx_tile_supported = lambda: False\n"
    shim = Path(tempfile.mkdtemp(prefix="cacheblend-noamx-"))
    (shim / "sitecustomize.py").write_text(hide_amx)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH"))
                                               if p)
    exec(hide_amx)  # this process too

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import blend
    from blend.assets import model_path

    model = str(model_path())
    tok = AutoTokenizer.from_pretrained(model)
    cs = cases(tok)
    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=4096, seed=0)
    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=LOGPROBS)
    t0 = time.time()

    llm = LLM(model=model, **engine)
    plain = llm.generate([{"prompt_token_ids": c["ids"]} for c in cs["reuse"]], sp, use_tqdm=False)
    ref = [first_token_row(o) for o in plain]
    plain_tokens = [o.outputs[0].token_ids[0] for o in plain]
    del llm, plain
    gc.collect()

    store = tempfile.mkdtemp(prefix="cacheblend-klref-")
    ktc = blend.kv_transfer_config(store={"backend": "local", "path": store},
                                   cache_fuse_metadata={"recomp_ratio": RATIO})
    llm = LLM(model=model, kv_transfer_config=ktc, **engine)
    src = [blend.BlendPrompt(c["ids"], c["spans"]) for c in cs["reuse_src"]]
    llm.generate(src, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    outs = llm.generate([blend.BlendPrompt(c["ids"], c["spans"]) for c in cs["reuse"]], sp,
                        use_tqdm=False)
    reports = [(o.kv_transfer_params or {}).get("blend") or {} for o in outs]
    got = [first_token_row(o) for o in outs]
    kls = kl_rows(ref, got)
    import vllm

    res = {
        "what": "first-answer-token KL(plain vLLM || blended vLLM) on reordered chunk reuse, "
                "vLLM CPU; the GPU suite (tests/test_vllm_gpu.py) must stay within 10% of it",
        "model": os.path.basename(model), "vllm": vllm.__version__, "device": "cpu",
        "dtype": "bfloat16", "recomp_ratio": RATIO, "logprobs": LOGPROBS,
        "engine": {**engine, "cpu_attn_isa": "vec (AMX hidden, see the docstring)"},
        "kl": [round(k, 6) for k in kls], "mean_kl": round(sum(kls) / len(kls), 6),
        "chunk_hit_rate": [r.get("chunk_hit_tokens", 0) / max(1, r.get("chunk_tokens", 0))
                           for r in reports],
        "plain_first_tokens": plain_tokens,
        "blend_first_tokens": [o.outputs[0].token_ids[0] for o in outs],
        "seconds": round(time.time() - t0, 1),
        "cases": cs,
    }
    assert all(r.get("chunk_tokens") for r in reports), reports
    Path(args.out).write_text(dumps(res))
    assert json.loads(Path(args.out).read_text()) == json.loads(json.dumps(res))
    print(json.dumps({k: v for k, v in res.items() if k != "cases"}, indent=1))


if __name__ == "__main__":
    main()
