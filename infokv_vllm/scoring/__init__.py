"""Which cached tokens to keep: one small policy dataclass each (kvpress style), behind `base.ScoringPolicy`.

A policy only scores the tokens; `selection.select_tokens` turns scores into kept indices the same way for every
policy (sinks and the observation window always kept, equal counts per layer and KV head).

`POLICIES` is the one registry of methods: the `--kv-compression` choices, each policy's `--kv-*` parameter flags,
their checks and the docs' tables are generated from it. Adding a policy is one module and one line here
(docs/adding-a-policy.md).
"""

from __future__ import annotations

import dataclasses

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput
from infokv_vllm.scoring.infokv import EntropyPolicy, InfoKVPolicy
from infokv_vllm.scoring.random import RandomPolicy
from infokv_vllm.scoring.rkv import RKVPolicy
from infokv_vllm.scoring.selection import eviction_losses, select_tokens
from infokv_vllm.scoring.snapkv import SnapKVPolicy
from infokv_vllm.scoring.streaming import StreamingPolicy

POLICIES: dict[str, type[ScoringPolicy]] = {
    cls.name: cls for cls in (InfoKVPolicy, SnapKVPolicy, StreamingPolicy, RandomPolicy, EntropyPolicy, RKVPolicy)}


def policy_parameters() -> dict[str, dataclasses.Field]:
    """Every registered policy's parameters by name. Policies that share a parameter share its declaration (a
    base such as `PooledAttention`), so one name is one flag with one meaning."""
    parameters: dict[str, dataclasses.Field] = {}
    for cls in POLICIES.values():
        for parameter in dataclasses.fields(cls):
            known = parameters.setdefault(parameter.name, parameter)
            if known is not parameter:
                raise TypeError(f"policy {cls.name} declares its own parameter {parameter.name!r}, which another "
                                "policy declares too: share one declaration (a base dataclass), or rename it")
    return parameters


def policies_with(parameter: str) -> list[str]:
    """The registered policies that take `parameter`."""
    return [name for name, cls in POLICIES.items() if parameter in {f.name for f in dataclasses.fields(cls)}]


__all__ = ["POLICIES", "ScoringPolicy", "SelectionInput", "eviction_losses", "policies_with", "policy_parameters",
           "select_tokens"]
