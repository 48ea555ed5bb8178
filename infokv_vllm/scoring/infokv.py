"""InfoKV: attention fused with an entropy signal (docs/method.md, "The signals, as implemented").

A is the pooled window attention and E combines the token entropy H with the layer's representation evolution R
(`entropy_score`: H*R, H+R or H alone), both per (layer, KV head) over the candidate tokens (all but sinks and
window). `alpha` is the entropy signal's share; the fusion rule (`FUSION_RULES`, `--kv-fusion`) says of what:

- `sum`: S = (1 - alpha) * A / sum(A) + alpha * E / sum(E), the rule the method started from. Sum-normalised
  attention is concentrated on a few tokens and the entropy signal is spread out, so the fused top-k is mostly
  attention's: what only entropy finds is lost (docs/results/quality.md, "Fusion").
- `rank` (the default): the same weights on each signal's quantile among the candidates, so both signals span
  [0, 1] alike whatever their concentration. Chosen on the pass-key and decode-fidelity data in
  docs/results/quality.md ("Fusion"): at least as good as `sum` at every budget measured, and far closer to the
  full cache in decoding.
- `split`: a share alpha of the candidates' budget is reserved for entropy's top tokens; attention fills the rest.
  Whatever each signal ranks highest is kept, by construction.

`redundancy` (0.3 by default, chosen on GSM8K train) subtracts R-KV's key redundancy (`rkv.key_redundancy`), as a
quantile among the candidates times that weight, from the fused score, in compactions while decoding: in a
reasoning trace that restates a step, the older copies go first, whatever attention and entropy say of them. The
prompt's own compaction leaves it out: a document does not restate itself the way a trace does, and its similarity
matrix grows with the square of the prompt.

`value_norm` (0.3 by default, chosen on GSM8K train) adds each candidate's value-vector norm, as a quantile times
that weight, in the same compactions: VaSE (arXiv 2606.03928) finds that evicting tokens with large values sends
reasoning models into repetition loops, and protecting them avoids it.

`sample_temperature` (0 by default: the deterministic top k) and `sample_top_share` make the kept set of each
(layer, KV head) a seeded draw instead (`sampling.gumbel_top_k`, the same seeding as the `random` policy), to
combine the fused score with the per-head diversity that makes random eviction strong on reasoning
(docs/results/gsm8k.md): a share of the candidates' budget goes to the top-scored candidates, the rest is drawn
without replacement with probability proportional to exp(q / temperature), q being each candidate's fused score
as a quantile among the candidates of its (layer, head). So the temperature is on a rank scale, whatever the
scale of the fused score: a candidate ranked a share t of the candidates higher than another is e^(t /
temperature) times as likely to be drawn first; at 0.1 the draw stays close to the top k, at 1 the top
candidate is e times as likely as the last. It applies to every compaction, of the prompt and while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from infokv_vllm.scoring.base import PooledAttention, ScoringPolicy, SelectionInput
from infokv_vllm.scoring.rkv import request_redundancy
from infokv_vllm.scoring.sampling import Seeded, gumbel_top_k
from infokv_vllm.signals import ATTENTION, ENTROPY, REPRESENTATION
from infokv_vllm.setting_checks import setting
from infokv_vllm.signals.attention import pool_scores

_EPS = 1e-12

EntropyScore = Literal["product", "sum", "entropy_only"]
Fusion = Literal["sum", "rank", "split"]


def normalise_over(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Divide each (layer, head) row by its sum over the candidates (non-candidates are overridden later)."""
    total = (scores * candidates).sum(dim=-1, keepdim=True)
    return scores / (total + _EPS)


def quantile_over(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each candidate's rank among the candidates of its (layer, head), scaled to [0, 1]; tied values share
    their average rank (so a flat signal favours no position).

    From one sort: a value's average rank is the middle of its run of equal values in sorted order, whose first
    and last index running maximum and minimum find (a quarter of the cost of binary-searching every value)."""
    count = int(candidates.sum())
    length = scores.shape[-1]
    # Non-candidates at -inf: one run below every candidate, ranked below 0 and clamped there.
    ordered, order = scores.masked_fill(~candidates, float("-inf")).sort(dim=-1)
    index = torch.arange(length, device=scores.device).expand_as(ordered)
    run_starts = torch.ones_like(ordered, dtype=torch.bool)
    run_starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run_ends = torch.ones_like(run_starts)
    run_ends[..., :-1] = run_starts[..., 1:]
    first = torch.where(run_starts, index, 0).cummax(dim=-1).values
    last = torch.where(run_ends, index, length - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    ranks = ((first + last).float() / 2 - (length - count)).clamp_(min=0) / max(count - 1, 1)
    return torch.empty_like(ranks).scatter_(-1, order, ranks)


def fuse_sum(attention, entropy, candidates, alpha: float, request: SelectionInput) -> torch.Tensor:
    return (1.0 - alpha) * normalise_over(attention, candidates) + alpha * normalise_over(entropy, candidates)


def fuse_rank(attention, entropy, candidates, alpha: float, request: SelectionInput) -> torch.Tensor:
    return (1.0 - alpha) * quantile_over(attention, candidates) + alpha * quantile_over(entropy, candidates)


def fuse_split(attention, entropy, candidates, alpha: float, request: SelectionInput) -> torch.Tensor:
    chosen = request.kept_len - request.sinks - request.window  # candidates the compaction keeps
    reserved = round(alpha * chosen)
    scores = quantile_over(attention, candidates)  # in [0, 1]
    if reserved:
        top_entropy = entropy.masked_fill(~candidates, float("-inf")).topk(reserved, dim=-1).indices
        scores = scores.scatter(-1, top_entropy, 2.0)  # above every attention pick
    return scores


FUSION_RULES = {"sum": fuse_sum, "rank": fuse_rank, "split": fuse_split}


@dataclass(frozen=True)
class EntropySignal:
    """The parameters of policies that read InfoKV's entropy signal (token entropy, with the representation
    evolution). `entropy_top_k` is also how the workers record token entropy."""

    entropy_top_k: int = setting(10, "Token entropy is computed over the k most probable tokens, normalised by "
                                     "log k.", minimum=2)
    entropy_score: EntropyScore = setting(
        "product", "How token entropy H and representation evolution R form the entropy signal: 'product' H*R, "
                   "'sum' H+R, 'entropy_only' H.")

    @property
    def entropy_signals(self) -> set[str]:
        return {ENTROPY} if self.entropy_score == "entropy_only" else {ENTROPY, REPRESENTATION}

    def entropy_signal(self, request: SelectionInput, candidates: torch.Tensor) -> torch.Tensor:
        token_entropy = request.signals[ENTROPY]
        if self.entropy_score == "entropy_only":
            return token_entropy
        evolution = normalise_over(request.signals[REPRESENTATION], candidates)
        if self.entropy_score == "product":
            return token_entropy * evolution
        return normalise_over(token_entropy, candidates) + evolution


@dataclass(frozen=True)
class InfoKVPolicy(PooledAttention, EntropySignal, Seeded, ScoringPolicy):
    name = "infokv"
    summary = ("InfoKV: window attention fused with the entropy signal, plus decode-time redundancy and value-norm "
               "terms")

    alpha: float = setting(
        0.3, "InfoKV: the entropy signal's share of the fused score (sum, rank) or of the budget (split); 1 - alpha "
             "goes to attention.", minimum=0, maximum=1)
    fusion: Fusion = setting(
        "rank", "InfoKV fusion rule: 'sum' (1-alpha)*A/sum(A) + alpha*E/sum(E); 'rank' the same on each signal's "
                "quantile; 'split' a share alpha of the budget reserved for entropy's top tokens, the rest by "
                "attention.")
    redundancy: float = setting(
        0.3, "InfoKV: weight of R-KV's key redundancy, subtracted from the fused score as a quantile among the "
             "candidates when compressing during decoding (0 = off): of tokens the trace restates, the older copies "
             "go first. 0.3 was chosen on GSM8K train.", minimum=0, maximum=1)
    value_norm: float = setting(
        0.3, "InfoKV: weight of each token's value-vector norm, added to the fused score as a quantile among the "
             "candidates when compressing during decoding (0 = off). VaSE (arXiv 2606.03928): evicting tokens with "
             "large values sends reasoning models into loops. 0.3 was chosen on GSM8K train (loops 5-6%% -> 1-2%%, "
             "+2-3 points; docs/results/gsm8k.md).", minimum=0, maximum=1)
    sample_temperature: float = setting(
        0.0, "InfoKV: draw each layer and KV head's kept candidates without replacement, with probability "
             "proportional to exp(q / temperature), q the fused score's quantile among the candidates (0 = the "
             "deterministic top k; at 1 the top candidate is e times as likely as the last). Seeded by --kv-seed, "
             "the request id and its length.", minimum=0)
    sample_top_share: float = setting(
        0.0, "InfoKV: with a sample temperature, the share of the candidates' budget kept by score first; the rest "
             "is drawn (0 = all drawn).", minimum=0, maximum=1)

    def reads_keys(self, decoding: bool) -> bool:
        return decoding and self.redundancy > 0

    def reads_values(self, decoding: bool) -> bool:
        return decoding and self.value_norm > 0

    @property
    def signals(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(self.entropy_signals | ({ATTENTION} if self.alpha < 1.0 else set()))

    def scores(self, request: SelectionInput) -> torch.Tensor:
        fused = self.fused_scores(request)
        if self.sample_temperature == 0:
            return fused
        candidates = request.candidates()
        top = round(self.sample_top_share * (request.kept_len - request.sinks - request.window))
        return gumbel_top_k(quantile_over(fused, candidates), self.uniform(request), candidates,
                            self.sample_temperature, top)

    def fused_scores(self, request: SelectionInput) -> torch.Tensor:
        """The fused score with the decode-time terms, before any sampling."""
        candidates = request.candidates()
        entropy = self.entropy_signal(request, candidates)
        if self.alpha == 1.0:
            fused = entropy
        else:
            attention = pool_scores(request.signals[ATTENTION], self.pooling_kernel)
            fused = FUSION_RULES[self.fusion](attention, entropy, candidates, self.alpha, request)
        reads_keys, reads_values = self.reads_keys(request.decoding), self.reads_values(request.decoding)
        if not (reads_keys or reads_values):
            return fused
        if self.alpha == 1.0 or self.fusion == "sum":
            fused = quantile_over(fused, candidates)  # on the [0, 1] scale the terms below use
        if reads_keys:
            redundancy = request_redundancy(request).to(fused.device)
            fused = fused - self.redundancy * quantile_over(redundancy, candidates)
        if reads_values:
            norms = request.values.float().norm(dim=-1).to(fused.device)
            fused = fused + self.value_norm * quantile_over(norms, candidates)
        return fused


@dataclass(frozen=True)
class EntropyPolicy(EntropySignal, ScoringPolicy):
    """InfoKV's entropy signal alone (InfoKV at alpha = 1 without its decode-time terms), for ablation."""

    name = "entropy"
    summary = "the entropy signal only (InfoKV with alpha = 1)"

    @property
    def signals(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(self.entropy_signals)

    def scores(self, request: SelectionInput) -> torch.Tensor:
        return self.entropy_signal(request, request.candidates())
