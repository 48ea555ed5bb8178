"""InfoKV: attention fused with an entropy signal (method doc, "Design defaults" 1-4).

S = (1 - alpha) * A + alpha * E over the candidate tokens, each signal sum-normalised over the candidates of its
(layer, KV head), where A is the pooled window attention and E combines the token entropy H with the layer's
representation evolution R (`entropy_score`: H*R, H+R or H alone).
"""

from __future__ import annotations

import torch

from infokv_vllm.scoring.base import ScoringPolicy, SelectionInput
from infokv_vllm.signals import ATTENTION, ENTROPY, REPRESENTATION
from infokv_vllm.signals.attention import pool_scores

_EPS = 1e-12


def normalise_over(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Divide each (layer, head) row by its sum over the candidates (non-candidates are overridden later)."""
    total = (scores * candidates).sum(dim=-1, keepdim=True)
    return scores / (total + _EPS)


class InfoKVPolicy(ScoringPolicy):
    name = "infokv"

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def signals(self) -> frozenset[str]:  # type: ignore[override]
        needed = {ENTROPY}
        if self.alpha < 1.0:
            needed.add(ATTENTION)
        if self.config.entropy_score != "entropy_only":
            needed.add(REPRESENTATION)
        return frozenset(needed)

    def entropy_signal(self, request: SelectionInput, candidates: torch.Tensor) -> torch.Tensor:
        token_entropy = request.signals[ENTROPY]
        if self.config.entropy_score == "entropy_only":
            return token_entropy
        evolution = normalise_over(request.signals[REPRESENTATION], candidates)
        if self.config.entropy_score == "product":
            return token_entropy * evolution
        return normalise_over(token_entropy, candidates) + evolution

    def scores(self, request: SelectionInput) -> torch.Tensor:
        candidates = request.candidates()
        fused = self.alpha * normalise_over(self.entropy_signal(request, candidates), candidates)
        if self.alpha < 1.0:
            attention = pool_scores(request.signals[ATTENTION], self.config.pooling_kernel)
            fused = fused + (1.0 - self.alpha) * normalise_over(attention, candidates)
        return fused


class EntropyPolicy(InfoKVPolicy):
    """InfoKV without attention (alpha = 1), for ablation."""

    name = "entropy"

    @property
    def alpha(self) -> float:
        return 1.0
