"""The model-adapter interface: the only way the blender touches a model.

A decoder layer is split where the blender must step in: `qkv` (input norm,
projections, q/k norms, RoPE) hands fresh K/V to the blender, which fuses them
into the cache and runs attention itself; `finish_layer` applies the output
projection, residuals and MLP. `qkv` also hands back the residual stream as
`finish_layer` wants it, so an adapter that folds the input residual in there
need not fold it again (the blender only ever selects rows of it). Adapters exist for `transformers` models
(offline, notebooks, GPU benchmarks) and for vLLM's loaded model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

# RoPE variants whose angle is linear in position: a chunk moved by d is
# re-rotated exactly by R(d * inv_freq). Others (dynamic NTK, longrope) change
# inv_freq with sequence length and are refused.
LINEAR_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model family or its RoPE variant cannot be blended exactly."""


@dataclass(frozen=True)
class RopeSpec:
    """What re-rotation needs: pure per-pair frequencies (no mscale) and the pairing style."""

    inv_freq: torch.Tensor  # [rotary_dim // 2] fp32
    is_neox: bool
    rope_type: str = "default"

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()


class ModelAdapter(ABC):
    """Per-family view of a decoder-only model, token-major (`[N, ...]`, no batch dim)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rope: RopeSpec
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[N]` -> residual stream `[N, hidden]`."""

    @abstractmethod
    def qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream -> q `[N, Hq, D]`, k, v `[N, Hkv, D]` (RoPE applied at `positions`)
        and the stream `finish_layer` takes (rows of it may be selected in between)."""

    @abstractmethod
    def finish_layer(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Attention output `[N, Hq, D]` -> next residual stream (o_proj, residuals, MLP)."""

    @abstractmethod
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream -> logits `[N, vocab]` (final norm, LM head)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Fields for `keys.model_fingerprint` (model id, revision, rope config...)."""

    def reduce_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-token selection scores summed over every shard of the model.

        A tensor-parallel rank holds a share of the KV heads, so its deviation
        covers those heads only; every rank must rank the same totals, or the
        ranks recompute different tokens and their hidden states part ways.
        """
        return scores


def check_rope_type(rope_type: str) -> None:
    if rope_type not in LINEAR_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} cannot be re-rotated exactly; supported: {LINEAR_ROPE_TYPES}")
