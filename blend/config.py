"""`cache_fuse_metadata`: the blend knobs, validated once at start-up.

Names follow the original CacheBlend. A wrong key or value raises here, naming
the key and the allowed range, so a bad config never reaches a request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEVIATIONS = ("v_l2", "k_l2", "k_l1", "kv_l2")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash")
SELECTIONS = ("deviation", "query", "hybrid", "cheap")


class BlendConfigError(ValueError):
    """A `cache_fuse_metadata` key or value is outside what the blender accepts."""


@dataclass(frozen=True)
class BlendConfig:
    """Validated blend settings.

    recomp_ratio:  fraction of cached tokens recomputed, in [0, 1].
    check_layers:  layers where deviation is measured (sorted, >= 1: layer-0
                   KV is context-free, so it cannot deviate).
    recomp_ratios: one ratio per check layer, non-increasing (gradual
                   filtering); defaults to `recomp_ratio` at every check layer.
    deviation:     v_l2 (CacheBlend), k_l2 (LMCache), k_l1 (UCM) or kv_l2.
    sink_tokens:   first k tokens of each chunk always recomputed (EPIC).
    selection:     how check layers rank cached tokens: deviation (CacheBlend),
                   query (the question's attention to them), hybrid (both,
                   normalized and summed), cheap (no full-token check layer).
    query_weight:  hybrid only: weight of the query term against deviation.
    attention_backend: auto (triton on CUDA, torch otherwise), torch, triton, flash.
    cuda_graphs:   replay the layers after the last check layer as CUDA graphs, one per
                   layer and row bucket (`blend/layer_graphs.py`); triton backend, CUDA,
                   one TP rank. Off by default until measured on the GPU.
    """

    recomp_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    recomp_ratios: tuple[float, ...] | None = None
    deviation: str = "v_l2"
    sink_tokens: int = 0
    attention_backend: str = "auto"
    selection: str = "deviation"
    query_weight: float = 0.5
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _ratio("recomp_ratio", self.recomp_ratio)
        if not self.check_layers:
            raise BlendConfigError("check_layers: must name at least one layer, e.g. [1]")
        for layer in self.check_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
                raise BlendConfigError(
                    f"check_layers: {layer!r} is not an int layer index >= 1 "
                    "(layer 0 KV does not depend on context)")
        if list(self.check_layers) != sorted(set(self.check_layers)):
            raise BlendConfigError(
                f"check_layers: {list(self.check_layers)} must be strictly increasing")
        if self.recomp_ratios is not None:
            if len(self.recomp_ratios) != len(self.check_layers):
                raise BlendConfigError(
                    f"recomp_ratios: {len(self.recomp_ratios)} ratios for "
                    f"{len(self.check_layers)} check_layers; give one per check layer")
            for r in self.recomp_ratios:
                _ratio("recomp_ratios", r)
            if any(b > a for a, b in zip(self.recomp_ratios, self.recomp_ratios[1:])):
                raise BlendConfigError(
                    f"recomp_ratios: {list(self.recomp_ratios)} must be non-increasing")
        if self.deviation not in DEVIATIONS:
            raise BlendConfigError(f"deviation: {self.deviation!r} not in {DEVIATIONS}")
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) \
                or self.sink_tokens < 0:
            raise BlendConfigError(f"sink_tokens: {self.sink_tokens!r} must be an int >= 0")
        if self.selection not in SELECTIONS:
            raise BlendConfigError(f"selection: {self.selection!r} not in {SELECTIONS}")
        if self.selection == "cheap" and self.recomp_ratios is not None:
            raise BlendConfigError(
                "recomp_ratios: selection 'cheap' picks one set before layer 0 (no gradual "
                "filtering); give recomp_ratio only")
        if isinstance(self.query_weight, bool) or not isinstance(self.query_weight, (int, float)) \
                or not math.isfinite(self.query_weight) or self.query_weight < 0:
            raise BlendConfigError(f"query_weight: {self.query_weight!r} must be a number >= 0")
        if not isinstance(self.cuda_graphs, bool):
            raise BlendConfigError(f"cuda_graphs: {self.cuda_graphs!r} must be true or false")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise BlendConfigError(
                f"attention_backend: {self.attention_backend!r} not in {ATTENTION_BACKENDS}")

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any] | None) -> BlendConfig:
        """Parse `cache_fuse_metadata`; unknown keys raise with the allowed ones."""
        meta = dict(meta or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(meta) - allowed)
        if unknown:
            raise BlendConfigError(
                f"cache_fuse_metadata: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        for key in ("check_layers", "recomp_ratios"):
            if meta.get(key) is not None:
                if isinstance(meta[key], (int, float)):
                    meta[key] = [meta[key]]
                meta[key] = tuple(meta[key])
        return cls(**meta)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["check_layers"] = list(self.check_layers)
        if self.recomp_ratios is not None:
            d["recomp_ratios"] = list(self.recomp_ratios)
        return d

    def ratios(self) -> tuple[float, ...]:
        """The ratio kept after each check layer."""
        return self.recomp_ratios or (self.recomp_ratio,) * len(self.check_layers)

    def check_model(self, num_layers: int) -> None:
        """Check layer indexes against a model (raised at model binding)."""
        bad = [c for c in self.check_layers if c >= num_layers]
        if bad:
            raise BlendConfigError(
                f"check_layers: {bad} out of range for a {num_layers}-layer model; "
                f"allowed 1..{num_layers - 1}")


def _ratio(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise BlendConfigError(f"{key}: {value!r} must be a number in [0, 1]")


def num_recompute(ratio: float, num_cached: int) -> int:
    """Tokens recomputed out of `num_cached` at `ratio` (ceil, so any r > 0 recomputes some)."""
    return min(num_cached, math.ceil(ratio * num_cached - 1e-9))
