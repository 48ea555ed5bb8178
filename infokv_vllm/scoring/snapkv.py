"""SnapKV / H2O-style: keep the tokens the observation window attends to most."""

from __future__ import annotations

import torch

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput
from infokv_vllm.signals import ATTENTION
from infokv_vllm.signals.attention import pool_scores


class SnapKVPolicy(ScoringPolicy):
    name = "snapkv"
    signals = frozenset({ATTENTION})

    def scores(self, request: SelectionInput) -> torch.Tensor:
        return pool_scores(request.signals[ATTENTION], self.config.pooling_kernel)
