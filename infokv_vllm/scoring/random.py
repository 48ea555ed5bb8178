"""Random eviction: the control every scored policy must beat."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput
from infokv_vllm.setting_checks import setting


@dataclass(frozen=True)
class RandomPolicy(ScoringPolicy):
    name = "random"
    summary = "a seeded random choice (a control)"

    seed: int = setting(0, "Seed of the 'random' policy.", minimum=0, maximum=2**63 - 1)  # torch's 64-bit seeds

    def scores(self, request: SelectionInput) -> torch.Tensor:
        # Seeded from the request and its length, not from process state, so every tensor-parallel rank and a
        # rerun of the same workload draw the same tokens.
        seed = zlib.crc32(f"{self.seed}:{request.request_id}:{request.physical_len}".encode())
        generator = torch.Generator().manual_seed(seed)
        shape = (request.num_layers, request.num_kv_heads, request.physical_len)
        return torch.rand(shape, generator=generator).to(request.device)
