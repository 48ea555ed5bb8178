"""StreamingLLM: keep the attention sinks and the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput


@dataclass(frozen=True)
class StreamingPolicy(ScoringPolicy):
    name = "streaming"
    summary = "StreamingLLM: the sinks and the most recent tokens"

    def scores(self, request: SelectionInput) -> torch.Tensor:
        recency = torch.arange(request.physical_len, dtype=torch.float32, device=request.device)
        return recency.expand(request.num_layers, request.num_kv_heads, request.physical_len)
