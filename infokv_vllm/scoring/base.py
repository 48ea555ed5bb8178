"""The scoring interface every compression policy implements, and the parameters several policies share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from infokv_vllm.setting_checks import SettingError, check_settings, setting


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


@dataclass(frozen=True)
class ScoringPolicy(ABC):
    """Scores every cached token of a request per (layer, KV head); higher means more worth keeping.

    A policy is a frozen dataclass whose fields are its parameters, each declared with `setting(default, help,
    range)`: the registry (`scoring.POLICIES`) turns them into `--kv-*` flags, `additional_config` keys, checks and
    the docs' rows. `name` is its `--kv-compression` choice and `summary` the one line that choice's help shows.

    `signals` names what the model runner must record for it (`infokv_vllm.signals`); it records nothing else.
    A policy that `reads_keys` (`reads_values`) gets the request's cached keys (values) too, read from the KV pages
    when it compacts.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    signals: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        def fail(parameter: str, why: str) -> None:
            raise SettingError(f"invalid {self.name} parameter {parameter}: {why}", parameter, why)

        check_settings(self, fail)

    def reads_keys(self, decoding: bool) -> bool:
        """Whether scoring a compaction (of the prompt, or while decoding) needs the request's cached keys."""
        return False

    def reads_values(self, decoding: bool) -> bool:
        """Whether scoring a compaction needs the request's cached values."""
        return False

    @abstractmethod
    def scores(self, request: SelectionInput) -> torch.Tensor:
        """A float tensor [num_layers, num_kv_heads, physical_len]."""


@dataclass(frozen=True)
class PooledAttention:
    """The parameter of policies that read the window attention signal (`signals.attention.pool_scores`)."""

    pooling_kernel: int = setting(7, "Attention scores are max-pooled along the sequence with this (odd) kernel "
                                     "size.", odd=True)
