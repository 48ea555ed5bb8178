"""SnapKV / H2O-style: keep the tokens the observation window attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.scoring.base import PooledAttention, ScoringPolicy, SelectionInput
from infokv_vllm.signals import ATTENTION
from infokv_vllm.signals.attention import pool_scores


@dataclass(frozen=True)
class SnapKVPolicy(PooledAttention, ScoringPolicy):
    name = "snapkv"
    summary = "SnapKV: window attention only"
    signals = frozenset({ATTENTION})

    def scores(self, request: SelectionInput) -> torch.Tensor:
        return pool_scores(request.signals[ATTENTION], self.pooling_kernel)
