"""Which cached tokens to keep: one small policy class each (kvpress style), behind `base.ScoringPolicy`.

A policy only scores the tokens; `selection.select_tokens` turns scores into kept indices the same way for every
policy (sinks and the observation window always kept, equal counts per layer and KV head).

`POLICIES` is the one registry of methods: the `--kv-compression` choices, config validation and the benchmarks
read it (through `config.METHODS`, which adds `none`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput
from infokv_vllm.scoring.infokv import EntropyPolicy, InfoKVPolicy
from infokv_vllm.scoring.random import RandomPolicy
from infokv_vllm.scoring.rkv import RKVPolicy
from infokv_vllm.scoring.selection import eviction_losses, select_tokens
from infokv_vllm.scoring.snapkv import SnapKVPolicy
from infokv_vllm.scoring.streaming import StreamingPolicy

if TYPE_CHECKING:
    from infokv_vllm.config import CompressionConfig

POLICIES: dict[str, type[ScoringPolicy]] = {
    cls.name: cls for cls in (InfoKVPolicy, SnapKVPolicy, StreamingPolicy, RandomPolicy, EntropyPolicy, RKVPolicy)}


def make_policy(config: CompressionConfig) -> ScoringPolicy:
    return POLICIES[config.method](config)


__all__ = ["POLICIES", "ScoringPolicy", "SelectionInput", "eviction_losses", "make_policy", "select_tokens"]
