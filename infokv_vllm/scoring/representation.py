"""The representation-evolution signal: how much a decoder layer changes each token's residual stream."""

from __future__ import annotations

import torch


def representation_evolution(layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_l, h_{l+1}) per token; inputs [tokens, hidden]."""
    return 1.0 - torch.nn.functional.cosine_similarity(layer_input.float(), layer_output.float(), dim=-1)
