"""Scores to kept indices, identical for every policy."""

from __future__ import annotations

import torch


def select_tokens(scores: torch.Tensor, keep: int, sinks: int, window: int) -> torch.Tensor:
    """Indices [layers, heads, keep], ascending, of the tokens to keep.

    The first `sinks` and the last `window` tokens are always kept; the rest of the budget goes to the
    highest-scoring tokens in between. Every (layer, head) keeps the same count, which the paged layout needs.
    """
    length = scores.shape[-1]
    if not sinks + window <= keep <= length:
        raise ValueError(f"cannot keep {keep} of {length} tokens with {sinks} sinks and a window of {window}")
    protected = scores.clone()
    protected[..., :sinks] = float("inf")
    protected[..., length - window:] = float("inf")
    return protected.topk(keep, dim=-1).indices.sort(dim=-1).values
