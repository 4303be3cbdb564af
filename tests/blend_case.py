"""The offline blend test case shared by the engine and selection tests: prompt text and KL."""

from __future__ import annotations

import torch

SYSTEM = "You are a helpful assistant. Answer the question using the documents."
QUESTION = "Which statement does the second document describe, and how does it work?"


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over rows."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
