"""The model fingerprint as the connector computes it, from vLLM's config alone.

The scheduler process has no weights, yet it must look chunks up under the
same keys the workers store them with. So both sides derive the fingerprint
from `VllmConfig` only: model identity, a digest of the weight files'
names and sizes (a changed checkpoint changes it), dtype, layer and head
counts, the RoPE config and the tensor-parallel rank and size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from blend.keys import model_fingerprint

KV_LAYOUT = "L2NHD-postrope"  # what the store holds: [layers, 2, n, kv_heads, head_dim], K after RoPE


def _weights_revision(model: str, revision: str | None) -> str | None:
    """Digest of config.json and the weight files' names and sizes; the hub revision otherwise."""
    p = Path(model).expanduser()
    if not p.is_dir():
        return revision
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:32]


def rope_config(hf_config: Any) -> dict[str, Any]:
    """Every RoPE field that changes K after rotation."""
    out: dict[str, Any] = {}
    for name in ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
                 "max_position_embeddings"):
        v = getattr(hf_config, name, None)
        if v is not None:
            out[name] = v
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _with_yarn_impl(rope: dict[str, Any]) -> dict[str, Any]:
    """YaRN's attention scaling is folded into the stored K, and vLLM 0.33 computes it from
    other config fields than 0.26 did (`attention_factor`/`mscale` against `attn_factor`), so
    one store must not serve YaRN chunk KV across vLLM minor versions."""
    scaling = [rope.get(k) for k in ("rope_parameters", "rope_scaling")]
    if any(isinstance(d, dict) and "yarn" in (d.get("rope_type"), d.get("type"))
           for d in scaling):
        import vllm

        from blend.patches.table import version_key

        return {**rope, "vllm_yarn": version_key(vllm.__version__)}
    return rope


def vllm_identity(vllm_config: Any, tp_rank: int = 0) -> dict[str, Any]:
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    pc = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(mc.dtype) if cache_dtype in (None, "auto") else str(cache_dtype)
    return {
        "model_id": os.path.basename(os.path.normpath(str(mc.model))),
        "revision": _weights_revision(str(mc.model), getattr(mc, "revision", None)),
        "dtype": dtype,
        "num_layers": int(hf.num_hidden_layers),
        "num_kv_heads": int(mc.get_total_num_kv_heads()),
        "head_dim": int(mc.get_head_size()),
        "rope": _with_yarn_impl(rope_config(hf)),
        "tp_rank": int(tp_rank),
        "tp_size": int(pc.tensor_parallel_size),
        "kv_layout": KV_LAYOUT,
    }


def vllm_fingerprint(vllm_config: Any, tp_rank: int = 0) -> str:
    """Fingerprint for `keys.chunk_key`; identical in the scheduler and in rank `tp_rank`."""
    return model_fingerprint(**vllm_identity(vllm_config, tp_rank))
