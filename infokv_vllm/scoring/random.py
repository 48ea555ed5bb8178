"""Random eviction: the control every scored policy must beat."""

from __future__ import annotations

import zlib

import torch

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput


class RandomPolicy(ScoringPolicy):
    name = "random"

    def scores(self, request: SelectionInput) -> torch.Tensor:
        # Seeded from the request and its length, not from process state, so every tensor-parallel rank and a
        # rerun of the same workload draw the same tokens.
        seed = zlib.crc32(f"{self.config.seed}:{request.request_id}:{request.physical_len}".encode())
        generator = torch.Generator().manual_seed(seed)
        shape = (request.num_layers, request.num_kv_heads, request.physical_len)
        return torch.rand(shape, generator=generator).to(request.device)
