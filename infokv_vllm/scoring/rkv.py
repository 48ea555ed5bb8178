"""R-KV (Cai et al., "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models", 2025): importance minus
redundancy, the strongest decode-time anchor for reasoning traces.

Reasoning traces repeat themselves ("so the total is ...", the same number restated), and attention alone keeps
every copy of what the window attends to. R-KV scores each candidate by

    S = lambda * A - (1 - lambda) * R

- A, importance: SnapKV's window attention (softmax mass from the observation window's queries, averaged over the
  window and the query heads of the KV group, max-pooled along the sequence) - the `attention` signal.
- R, redundancy: per layer and KV head, the cosine similarity of each cached key to every other one (the
  diagonal zeroed); for each token, the similarity to its most recent near-duplicate (above
  `REDUNDANCY_THRESHOLD`) is cleared, so the copy the trace will read next survives. Each token's mean similarity
  to the others, softmax-normalised over the sequence, is its redundancy.

Both terms are distributions over the tokens, so lambda weighs like with like. The defaults are those of R-KV's
reference code (`rkv/compression/r1_kv.py` and `rkv/utils.py` in Zefan-Cai/R-KV: `mix_lambda` 0.07 as first
released, where later versions and TriAttention's copy use 0.1; threshold 0.5; `retain_direction="last"`). Two
differences, both from sharing the engine's attention signal with SnapKV and InfoKV: the window's attention is
the mean of each query head's softmax (R-KV takes the softmax of the group's largest logit), and its softmax also
spans the window's own keys (a per-query rescaling); sinks and window are kept by the shared selection, as for
every policy (R-KV keeps no sinks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.scoring.base import PooledAttention, ScoringPolicy, SelectionInput
from infokv_vllm.signals import ATTENTION
from infokv_vllm.signals.attention import pool_scores

MIX_LAMBDA = 0.07
REDUNDANCY_THRESHOLD = 0.5


def key_redundancy(keys: torch.Tensor, threshold: float = REDUNDANCY_THRESHOLD) -> torch.Tensor:
    """keys [heads, n, d] -> redundancy [heads, n], a softmax over the n tokens of each head."""
    unit = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-8)
    similarity = unit @ unit.transpose(-1, -2)  # [heads, n, n]
    similarity.diagonal(dim1=-2, dim2=-1).zero_()
    # For each token, its most recent near-duplicate keeps its score: the column of the last similar token of
    # each row is cleared (rows with none clear column 0, a sink, as R-KV does).
    positions = torch.arange(similarity.shape[-1], device=keys.device)
    latest = torch.where(similarity > threshold, positions, torch.zeros_like(positions)).amax(dim=-1)
    similarity.scatter_(-1, latest[..., None], 0.0)
    return similarity.mean(dim=-2).softmax(dim=-1)


def request_redundancy(request: SelectionInput) -> torch.Tensor:
    """`key_redundancy` of every layer of a request, [layers, kv_heads, physical_len]; one layer at a time, as the
    similarity matrices are [kv_heads, n, n]."""
    return torch.stack([key_redundancy(layer_keys) for layer_keys in request.keys])


@dataclass(frozen=True)
class RKVPolicy(PooledAttention, ScoringPolicy):
    name = "rkv"
    summary = "R-KV: window attention minus key redundancy"
    signals = frozenset({ATTENTION})

    def reads_keys(self, decoding: bool) -> bool:
        return True

    def scores(self, request: SelectionInput) -> torch.Tensor:
        importance = pool_scores(request.signals[ATTENTION], self.pooling_kernel)
        return MIX_LAMBDA * importance - (1.0 - MIX_LAMBDA) * request_redundancy(request).to(importance.device)
