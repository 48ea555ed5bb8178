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


def eviction_losses(scores: torch.Tensor, mass: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[candidates + 1]: the share of the observation window's attention that evicting the e = 0, 1, ...
    lowest-scored candidates (neither sinks nor window: those `select_tokens` evicts first) would lose, per
    (layer, head) a share of the attention all slots received, averaged over layers and heads.

    scores and mass (the attention signal: each slot's summed window probability) are [layers, heads, length].
    A share of the window's probability means the same in every request, so curves compare across a batch
    (the pool-wide mode) whatever scale or ranking the policy's own scores use."""
    length = scores.shape[-1]
    candidates = slice(sinks, length - window)
    order = scores[..., candidates].float().argsort(dim=-1)  # ascending: the first evicted first
    lost = mass[..., candidates].float().gather(-1, order).cumsum(dim=-1)
    total = mass.float().sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    shares = (lost / total).mean(dim=(0, 1))
    return torch.cat([shares.new_zeros(1), shares])
