"""Random eviction: the control every scored policy must beat.

With `--kv-keep-prompt` it is the Random Attention baseline (arXiv 2609.03430): the prompt is kept whole and the
generated tokens are evicted at random, independently in every layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput
from infokv_vllm.scoring.sampling import Seeded


@dataclass(frozen=True)
class RandomPolicy(Seeded, ScoringPolicy):
    name = "random"
    summary = "a seeded random choice per layer and KV head (a control; with --kv-keep-prompt, Random Attention)"

    def scores(self, request: SelectionInput) -> torch.Tensor:
        return self.uniform(request)
