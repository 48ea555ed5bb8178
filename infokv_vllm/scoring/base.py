"""The scoring interface every compression policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from infokv_vllm.config import CompressionConfig


@dataclass(frozen=True)
class SelectionInput:
    """What a policy knows about one request at the moment it is compressed."""

    request_id: str
    num_layers: int
    num_kv_heads: int
    # The lengths as a `Compaction` names them: slots the request holds now (indices 0..physical_len-1, in
    # logical order), and slots it holds after the compaction (sinks and window included).
    physical_len: int
    kept_len: int
    sinks: int
    window: int
    device: torch.device
    # [num_layers, num_kv_heads, physical_len] per signal in `ScoringPolicy.signals`
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    # [num_layers, num_kv_heads, physical_len, head_size], where the policy `reads_keys` / `reads_values`
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    decoding: bool = True  # False when the prompt itself is compressed, right after it is processed

    def candidates(self) -> torch.Tensor:
        """Mask [physical_len] of the tokens that compete for the budget (neither sinks nor window)."""
        mask = torch.ones(self.physical_len, dtype=torch.bool, device=self.device)
        mask[: self.sinks] = False
        mask[self.physical_len - self.window:] = False
        return mask


class ScoringPolicy(ABC):
    """Scores every cached token of a request per (layer, KV head); higher means more worth keeping.

    `signals` names what the model runner must record for it (`infokv_vllm.signals`); it records nothing else.
    A policy that `reads_keys` (`reads_values`) gets the request's cached keys (values) too, read from the KV pages
    when it compacts.
    """

    name: ClassVar[str]
    signals: ClassVar[frozenset[str]] = frozenset()

    def reads_keys(self, decoding: bool) -> bool:
        """Whether scoring a compaction (of the prompt, or while decoding) needs the request's cached keys."""
        return False

    def reads_values(self, decoding: bool) -> bool:
        """Whether scoring a compaction needs the request's cached values."""
        return False

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    @abstractmethod
    def scores(self, request: SelectionInput) -> torch.Tensor:
        """A float tensor [num_layers, num_kv_heads, physical_len]."""

