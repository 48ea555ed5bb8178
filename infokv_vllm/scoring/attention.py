"""The attention signal: how much softmax probability the observation window's queries give each cached slot.

This is the dense torch formulation, used by vLLM's CPU attention path and as the reference the Triton kernel
is tested against. Probabilities are over the full kept KV of the request (causal), summed over the window's
queries and over the query heads that share each KV head.
"""

from __future__ import annotations

import torch


def window_attention_mass(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """queries [T, q_heads, D], keys [kv_heads, S, D], query_positions [T] (physical slot of each query, which
    attends slots 0..position) -> [kv_heads, S] summed probabilities."""
    num_tokens, q_heads, _ = queries.shape
    kv_heads, length, _ = keys.shape
    group = q_heads // kv_heads
    grouped = queries.float().view(num_tokens, kv_heads, group, -1)
    logits = torch.einsum("tkgd,ksd->tkgs", grouped, keys.float()) * scale
    future = torch.arange(length, device=keys.device)[None, :] > query_positions[:, None]
    logits.masked_fill_(future[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).sum(dim=(0, 2))


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool along the sequence (last dim), same length: a kept token keeps its neighbours' context."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    pooled = torch.nn.functional.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1,
                                            padding=kernel // 2)
    return pooled.reshape(shape)
