"""Which cached tokens to keep: one signal module each, one small policy class each (kvpress style).

A policy only scores the tokens; `selection.select_tokens` turns scores into kept indices the same way for every
policy (sinks and the observation window always kept, equal counts per layer and KV head).
"""

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput, make_policy, policy_classes
from infokv_vllm.scoring.selection import select_tokens

__all__ = ["ScoringPolicy", "SelectionInput", "make_policy", "policy_classes", "select_tokens"]
