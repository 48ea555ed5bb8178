"""The scoring interface every compression policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from infokv_vllm.config import CompressionConfig


@dataclass(frozen=True)
class SelectionInput:
    """What a policy knows about one request at the moment it is compressed."""

    request_id: str
    num_layers: int
    num_kv_heads: int
    kept_len: int  # physical tokens currently cached (indices 0..kept_len-1, in logical order)
    device: torch.device


class ScoringPolicy(ABC):
    """Scores every cached token of a request per (layer, KV head); higher means more worth keeping."""

    name: ClassVar[str]

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    @abstractmethod
    def scores(self, request: SelectionInput) -> torch.Tensor:
        """A float tensor [num_layers, num_kv_heads, kept_len]."""


def policy_classes() -> dict[str, type[ScoringPolicy]]:
    """Every implemented policy by its `--kv-compression` name."""
    from infokv_vllm.scoring.random import RandomPolicy
    from infokv_vllm.scoring.streaming import StreamingPolicy

    return {cls.name: cls for cls in (StreamingPolicy, RandomPolicy)}


def make_policy(config: CompressionConfig) -> ScoringPolicy:
    return policy_classes()[config.method](config)
