"""Seeded random draws per (layer, KV head), shared by the `random` policy and InfoKV's sampled selection.

Every draw is seeded from the `seed` setting, the request id and the request's physical length, never from
process state: every tensor-parallel rank compacting the same request, and a rerun of the same workload, draw the
same tokens, and each compaction of a request (a different length) draws afresh.

`gumbel_top_k` turns scores into a draw without replacement: adding Gumbel noise to score / temperature and
taking the top k samples k tokens with probabilities proportional to exp(score / temperature) (the Gumbel-top-k
trick), so the shared selection (`selection.select_tokens`) keeps a sampled set without knowing it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from infokv_vllm.scoring.base import SelectionInput
from infokv_vllm.setting_checks import setting


@dataclass(frozen=True)
class Seeded:
    """The parameter of policies that draw at random."""

    seed: int = setting(0, "Seed of the random draws (the 'random' policy; InfoKV's sampling at a temperature), "
                           "combined with the request id and length: every tensor-parallel rank and a rerun draw "
                           "the same tokens.", minimum=0, maximum=2**63 - 1)  # torch's 64-bit seeds

    def generator(self, request: SelectionInput) -> torch.Generator:
        """A CPU generator for this compaction of this request (the draws are moved to the request's device)."""
        seed = zlib.crc32(f"{self.seed}:{request.request_id}:{request.physical_len}".encode())
        return torch.Generator().manual_seed(seed)

    def uniform(self, request: SelectionInput) -> torch.Tensor:
        """U(0, 1) draws [num_layers, num_kv_heads, physical_len], independent per layer and KV head."""
        shape = (request.num_layers, request.num_kv_heads, request.physical_len)
        return torch.rand(shape, generator=self.generator(request)).to(request.device)


def gumbel_top_k(scores: torch.Tensor, uniform: torch.Tensor, candidates: torch.Tensor, temperature: float,
                 top: int = 0) -> torch.Tensor:
    """Scores whose top k (per layer and KV head, over the candidates) is a draw of k candidates without
    replacement, each with probability proportional to exp(score / temperature), after the `top` highest-scored
    candidates, which are kept first.

    `scores` should be on a known scale (InfoKV passes quantiles in [0, 1]) for the temperature to mean anything;
    `uniform` holds the U(0, 1) draws of the same shape. At temperature 0 the order is the scores' own: the draw
    is the deterministic top k. The result is scores + temperature * Gumbel noise (the same order as score /
    temperature + noise, on the scores' own scale); the reserved top candidates are lifted above every other
    candidate. Any prefix of the resulting order is a draw, so a later compaction to a shorter length from the
    same scores (the pool-wide mode) is one too."""
    if temperature == 0 and top == 0:
        return scores
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniform.float().clamp(tiny, 1 - 1e-7)))
    drawn = scores.float() + temperature * gumbel.to(scores.device)
    if top:
        reserved = scores.masked_fill(~candidates, float("-inf")).topk(top, dim=-1).indices
        ceiling = drawn.masked_fill(~candidates, float("-inf")).amax(dim=-1, keepdim=True)
        kept_first = scores.gather(-1, reserved).float()
        lifted = ceiling + 1 + kept_first - kept_first.amin(dim=-1, keepdim=True)  # above every draw, in order
        drawn = drawn.scatter(-1, reserved, lifted)
    return drawn
