"""Scoring signals and policies on hand-built cases where the right answer is known."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from infokv_vllm.config import CompressionConfig
from infokv_vllm.scoring import POLICIES, SelectionInput, select_tokens
from infokv_vllm.scoring.infokv import EntropyPolicy, InfoKVPolicy
from infokv_vllm.kernels.window_attention import window_attention_mass
from infokv_vllm.signals.attention import pool_scores
from infokv_vllm.signals import ATTENTION, ENTROPY, REPRESENTATION
from infokv_vllm.signals.entropy import top_values, topk_entropy
from infokv_vllm.signals.representation import representation_evolution

LAYERS, HEADS, LENGTH, SINKS, WINDOW, KEEP = 2, 3, 40, 4, 8, 16


def selection_input(**signals) -> SelectionInput:
    return SelectionInput(request_id="r", num_layers=LAYERS, num_kv_heads=HEADS, physical_len=LENGTH, kept_len=KEEP,
                          sinks=SINKS, window=WINDOW, device=torch.device("cpu"), signals=signals)


def kept(method: str, request: SelectionInput, **settings) -> torch.Tensor:
    """The kept indices; InfoKV's decode-time redundancy and value-norm terms are off unless a test turns them on
    (these hand-built requests carry no keys or values)."""
    parameters = {name: value for name, value in {"pooling_kernel": 1, "redundancy": 0.0, "value_norm": 0.0}.items()
                  if name in POLICIES[method].__dataclass_fields__}
    config = CompressionConfig.from_settings({"method": method, "sinks": SINKS, **parameters, **settings})
    return select_tokens(config.policy.scores(request), KEEP, SINKS, WINDOW)


def flat(value: float) -> torch.Tensor:
    return torch.full((LAYERS, HEADS, LENGTH), value)


def test_every_method_has_a_policy():
    from infokv_vllm.config import method_names

    assert set(POLICIES) == set(method_names()) - {"none"}


def test_streaming_keeps_exactly_sinks_and_most_recent():
    indices = kept("streaming", selection_input())
    expected = torch.cat([torch.arange(SINKS), torch.arange(LENGTH - (KEEP - SINKS), LENGTH)])
    assert torch.equal(indices, expected.expand(LAYERS, HEADS, KEEP))


def test_selection_keeps_sinks_and_window_with_equal_counts():
    indices = kept("random", selection_input())
    assert indices.shape == (LAYERS, HEADS, KEEP)
    assert (indices.diff(dim=-1) > 0).all()
    for required in [*range(SINKS), *range(LENGTH - WINDOW, LENGTH)]:
        assert (indices == required).any(dim=-1).all()


def test_random_is_reproducible_per_request():
    request = selection_input()
    assert torch.equal(kept("random", request), kept("random", request))


def test_snapkv_keeps_the_token_that_receives_all_attention():
    attention = flat(0.0)
    attention[1, 2, 20] = 5.0
    attention[0, :, 11] = 5.0
    indices = kept("snapkv", selection_input(**{ATTENTION: attention}))
    assert (indices[1, 2] == 20).any() and (indices[0] == 11).any(dim=-1).all()


def test_entropy_policy_keeps_the_high_entropy_token():
    entropy, evolution = flat(0.1), flat(1.0)
    entropy[:, :, 17] = 0.9
    indices = kept("entropy", selection_input(**{ENTROPY: entropy, REPRESENTATION: evolution}))
    assert (indices == 17).any(dim=-1).all()


def test_infokv_fuses_both_signals():
    attention, entropy, evolution = flat(0.01), flat(0.01), flat(1.0)
    attention[:, :, 10] = 1.0  # the attention favourite
    entropy[:, :, 25] = 1.0  # the uncertain token
    request = selection_input(**{ATTENTION: attention, ENTROPY: entropy, REPRESENTATION: evolution})
    only_attention = kept("infokv", request, alpha=0.0)
    only_entropy = kept("infokv", request, alpha=1.0)
    fused = kept("infokv", request, alpha=0.3)
    assert (only_attention == 10).any(dim=-1).all() and (only_entropy == 25).any(dim=-1).all()
    assert (fused == 10).any(dim=-1).all() and (fused == 25).any(dim=-1).all()


def test_split_fusion_keeps_entropys_top_tokens_where_sum_fusion_loses_them():
    """Attention concentrated on more favourites than the budget holds, entropy spread out with one clear peak:
    the sum rule keeps attention's favourites only; `split` reserves alpha of the chosen tokens for entropy."""
    attention, entropy, evolution = flat(0.001), flat(0.5), flat(1.0)
    favourites = [6, 9, 13, 15, 18, 21, 23]  # 7 > the 4 candidates kept (KEEP - SINKS - WINDOW)
    attention[:, :, favourites] = 1.0
    entropy[:, :, 25] = 0.9
    request = selection_input(**{ATTENTION: attention, ENTROPY: entropy, REPRESENTATION: evolution})
    by_sum = kept("infokv", request, alpha=0.3, fusion="sum")
    by_split = kept("infokv", request, alpha=0.3, fusion="split")
    assert not (by_sum == 25).any()
    assert (by_split == 25).any(dim=-1).all()
    chosen = by_split[..., SINKS:KEEP - WINDOW]
    assert torch.isin(chosen, torch.tensor([*favourites, 25])).all()  # round(0.3 * 4) = 1 for entropy


def test_quantiles_are_average_ranks_among_the_candidates():
    from infokv_vllm.scoring.infokv import quantile_over

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (2, 3, 20), generator=generator).float()  # many ties
    candidates = torch.rand(20, generator=generator) > 0.3
    count = int(candidates.sum())
    expected = torch.zeros_like(scores)
    for row in itertools.product(range(2), range(3)):
        pool = scores[row][candidates]
        for token in candidates.nonzero().flatten().tolist():
            value = scores[row][token]
            rank = float((pool < value).sum()) + (float((pool == value).sum()) - 1) / 2
            expected[row][token] = rank / (count - 1)
    torch.testing.assert_close(quantile_over(scores, candidates), expected)


def test_rank_fusion_weighs_quantiles_not_magnitudes():
    """A huge attention peak counts no more than being first: with alpha 0.5 the token ranked second by both
    signals wins under `rank`, while under `sum` attention's peak wins although entropy ranks it last."""
    from infokv_vllm.scoring.infokv import fuse_rank, fuse_sum, quantile_over

    # slot 0 is a sink and slot 7 the window; candidates are slots 1-6
    attention = torch.tensor([0.0, 1000.0, 0.0, 3.0, 2.0, 1.0, 0.5, 0.0]).view(1, 1, 8)
    entropy = torch.tensor([0.0, 0.0, 9.0, 3.0, 2.0, 1.0, 0.5, 0.0]).view(1, 1, 8)
    request = SelectionInput(request_id="r", num_layers=1, num_kv_heads=1, physical_len=8, kept_len=3, sinks=1,
                             window=1, device=torch.device("cpu"), signals={})
    candidates = request.candidates()
    assert quantile_over(attention, candidates)[0, 0, 1:7].tolist() == pytest.approx([1.0, 0.0, 0.8, 0.6, 0.4, 0.2])
    assert int(fuse_rank(attention, entropy, candidates, 0.5, request)[0, 0, 1:7].argmax()) + 1 == 3
    # a flat signal ranks every candidate alike (ties share their average rank): no bias to early or late slots
    assert quantile_over(torch.ones(1, 1, 8), candidates)[0, 0, 1:7].tolist() == [0.5] * 6
    assert int(fuse_sum(attention, entropy, candidates, 0.5, request)[0, 0, 1:7].argmax()) + 1 == 1


def test_representation_evolution_weights_entropy_per_layer():
    entropy, evolution = flat(0.5), flat(0.1)
    evolution[0, :, 12] = 0.9  # layer 0 rewrites token 12, layer 1 rewrites token 30
    evolution[1, :, 30] = 0.9
    indices = kept("entropy", selection_input(**{ENTROPY: entropy, REPRESENTATION: evolution}))
    assert (indices[0] == 12).any(dim=-1).all() and (indices[1] == 30).any(dim=-1).all()


def test_policies_ask_only_for_the_signals_they_use():
    def signals(method, **settings):
        return CompressionConfig.from_settings({"method": method, **settings}).policy.signals

    assert signals("streaming") == signals("random") == frozenset()
    assert signals("snapkv") == {ATTENTION}
    assert signals("infokv") == {ATTENTION, ENTROPY, REPRESENTATION}
    assert signals("infokv", entropy_score="entropy_only") == {ATTENTION, ENTROPY}
    assert signals("entropy") == {ENTROPY, REPRESENTATION}
    assert signals("rkv") == {ATTENTION}
    assert [name for name in POLICIES if CompressionConfig(method=name).policy.reads_keys(True)] == [
        "infokv", "rkv"]


@pytest.mark.parametrize("vocab", [49152, 151936, 1000, 130])
def test_top_values_are_torch_topks(vocab):
    """Whole runs and a remainder (151936 = 1187 x 128), ties within a run and across runs, flat rows, and a
    vocabulary of fewer runs than k: the same values as torch.topk."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=generator) * 4
    logits[1] = 1.0
    logits[2, 300:330] = 50.0
    logits[3, ::97] = 20.0
    logits[4, -5:] = 30.0  # the largest values sit in the remainder
    for k in (1, 10, 20):
        expected = logits.topk(k, dim=-1).values
        assert torch.equal(top_values(logits, k).sort(dim=-1, descending=True).values, expected)


def test_topk_entropy_bounds():
    uniform = torch.zeros(1, 100)
    assert topk_entropy(uniform, 10).item() == pytest.approx(1.0)
    certain = torch.full((1, 100), -50.0)
    certain[0, 3] = 50.0
    assert topk_entropy(certain, 10).item() == pytest.approx(0.0, abs=1e-6)
    two_way = torch.full((1, 100), -1e4)
    two_way[0, :2] = 0.0
    assert topk_entropy(two_way, 4).item() == pytest.approx(math.log(2) / math.log(4))


def test_representation_evolution():
    h = torch.randn(5, 16)
    assert torch.allclose(representation_evolution(h, 3 * h), torch.zeros(5), atol=1e-6)
    assert torch.allclose(representation_evolution(h, -h), torch.full((5,), 2.0), atol=1e-6)


def test_window_attention_mass_matches_a_per_head_loop():
    torch.manual_seed(0)
    q_heads, kv_heads, dim, length = 6, 2, 8, 12
    queries, keys = torch.randn(3, q_heads, dim), torch.randn(kv_heads, length, dim)
    positions = torch.tensor([9, 10, 11])
    expected = torch.zeros(kv_heads, length)
    for t in range(3):
        for head in range(q_heads):
            kv = head // (q_heads // kv_heads)
            logits = keys[kv, : positions[t] + 1] @ queries[t, head] * 0.5
            expected[kv, : positions[t] + 1] += logits.softmax(-1)
    mass = window_attention_mass(queries, keys, positions, 0.5)
    torch.testing.assert_close(mass, expected, rtol=1e-5, atol=1e-6)
    assert mass.sum().item() == pytest.approx(3 * q_heads, rel=1e-5)


def test_pooling_spreads_peaks_to_neighbours():
    scores = torch.zeros(1, 1, 10)
    scores[0, 0, 5] = 1.0
    assert pool_scores(scores, 3)[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def rkv_redundancy_loop(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy written out token by token: [heads, n, d] -> [heads, n]."""
    heads, n, _ = keys.shape
    out = torch.zeros(heads, n)
    for head in range(heads):
        unit = [k / (k.norm() + 1e-8) for k in keys[head]]
        similarity = [[float(unit[i] @ unit[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        for i in range(n):
            similar = [j for j in range(n) if similarity[i][j] > threshold]
            similarity[i][similar[-1] if similar else 0] = 0.0  # the most recent near-duplicate keeps its score
        column_means = torch.tensor([sum(similarity[i][j] for i in range(n)) / n for j in range(n)])
        out[head] = column_means.softmax(-1)
    return out


def test_rkv_redundancy_matches_the_token_by_token_reference():
    from infokv_vllm.scoring.rkv import REDUNDANCY_THRESHOLD, key_redundancy

    torch.manual_seed(0)
    keys = torch.randn(2, 12, 4)
    keys[:, 7] = keys[:, 2] * 2  # duplicates, to cross the threshold
    torch.testing.assert_close(key_redundancy(keys), rkv_redundancy_loop(keys, REDUNDANCY_THRESHOLD))


def repeated_step(copies: list[int]) -> SelectionInput:
    """Unrelated keys except `copies`, one key restated; attention favours the copies a little."""
    keys = torch.eye(64)[:LENGTH].expand(LAYERS, HEADS, LENGTH, 64).clone()
    keys[:, :, copies] = torch.eye(64)[-1]
    attention = flat(1.0 / LENGTH)
    attention[:, :, copies] = 1.2 / LENGTH
    signals = {ATTENTION: attention, ENTROPY: flat(0.5), REPRESENTATION: flat(1.0)}
    return dataclasses.replace(selection_input(**signals), keys=keys)


def test_rkv_keeps_the_latest_of_repeated_tokens():
    """Candidates 10-30 restate one step (one key): attention favours all of them equally, more than the 4
    candidate slots hold, so SnapKV keeps four copies; R-KV keeps the latest copy and spends the rest on other
    tokens."""
    copies = list(range(10, 31, 2))
    request = repeated_step(copies)
    chosen = kept("rkv", request)[..., SINKS:KEEP - WINDOW]  # the 4 candidates kept
    assert (chosen == copies[-1]).any(dim=-1).all()
    assert torch.isin(chosen, torch.tensor(copies)).sum(dim=-1).eq(1).all()
    assert torch.isin(kept("snapkv", request)[..., SINKS:KEEP - WINDOW], torch.tensor(copies)).all()


def test_infokv_redundancy_term_drops_the_older_copies():
    copies = list(range(10, 31, 2))
    request = repeated_step(copies)
    without = kept("infokv", request)[..., SINKS:KEEP - WINDOW]
    with_redundancy = kept("infokv", request, redundancy=1.0)[..., SINKS:KEEP - WINDOW]
    assert torch.isin(without, torch.tensor(copies)).all()
    assert (with_redundancy == copies[-1]).any(dim=-1).all()
    # The latest copy and the one before it (R-KV's rule spares the latest copy's own latest duplicate a little):
    # two kept copies where attention and entropy alone keep four.
    assert torch.isin(with_redundancy, torch.tensor(copies)).sum(dim=-1).le(2).all()
    with_term = InfoKVPolicy(redundancy=0.5)
    assert with_term.reads_keys(decoding=True) and not with_term.reads_keys(decoding=False)  # not on the prompt
    assert not InfoKVPolicy(redundancy=0.0).reads_keys(decoding=True)
    prompt = dataclasses.replace(request, decoding=False, keys=None)
    assert torch.equal(kept("infokv", prompt, redundancy=1.0), kept("infokv", prompt))


def test_infokv_value_norm_term_keeps_large_value_tokens():
    """Attention and entropy favour candidates 10-13 a little; five other candidates carry values ten times
    larger. Without the term the favoured four fill the four candidate slots; with it (weight 1 against the fused
    score's [0, 1]) large-value tokens take them, and the prompt's own compaction never reads values."""
    large = [6, 15, 20, 25, 30]
    values = torch.ones(LAYERS, HEADS, LENGTH, 8)
    values[:, :, large] *= 10
    attention = flat(1.0 / LENGTH)
    attention[:, :, 10:14] = 1.5 / LENGTH
    signals = {ATTENTION: attention, ENTROPY: flat(0.5), REPRESENTATION: flat(1.0)}
    request = dataclasses.replace(selection_input(**signals), values=values)
    candidates = slice(SINKS, KEEP - WINDOW)
    assert torch.equal(kept("infokv", request)[..., candidates], torch.arange(10, 14).expand(LAYERS, HEADS, 4))
    assert torch.isin(kept("infokv", request, value_norm=1.0)[..., candidates], torch.tensor(large)).all()
    with_term = InfoKVPolicy(value_norm=0.5)
    assert with_term.reads_values(decoding=True) and not with_term.reads_values(decoding=False)
    assert not InfoKVPolicy(value_norm=0.0).reads_values(decoding=True)
    assert not EntropyPolicy().reads_values(decoding=True) and "value_norm" not in EntropyPolicy.__dataclass_fields__
