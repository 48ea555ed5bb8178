"""The token-entropy signal: how uncertain the model was when each token was produced."""

from __future__ import annotations

import math

import torch


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the top-k renormalised distribution of each row, divided by log k (so it lies in [0, 1]).

    Over the top k rather than the full vocabulary: the long tail adds noise, not information (method doc).
    """
    top = logits.float().topk(k, dim=-1).values
    log_probs = top.log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1) / math.log(k)
