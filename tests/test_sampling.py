"""InfoKV's sampled selection (`--kv-sample-temperature`, `--kv-sample-top-share`) and the seeded draws it shares
with the `random` policy."""

from __future__ import annotations

import pytest
import torch

from infokv_vllm.config import CompressionConfig
from infokv_vllm.scoring import SelectionInput, select_tokens
from infokv_vllm.signals import ATTENTION, ENTROPY, REPRESENTATION

LAYERS, HEADS, LENGTH, SINKS, WINDOW, KEEP = 4, 4, 200, 4, 16, 60
CHOSEN = KEEP - SINKS - WINDOW  # candidates kept


def request(request_id: str = "r", length: int = LENGTH) -> SelectionInput:
    """Signals that rank the candidates the same way in every layer and head, with no ties: attention and entropy
    both rise with the position (so the top k is the most recent candidates)."""
    rising = torch.linspace(0.01, 1.0, length).expand(LAYERS, HEADS, length).contiguous()
    return SelectionInput(request_id=request_id, num_layers=LAYERS, num_kv_heads=HEADS, physical_len=length,
                          kept_len=KEEP, sinks=SINKS, window=WINDOW, device=torch.device("cpu"),
                          signals={ATTENTION: rising, ENTROPY: rising, REPRESENTATION: torch.ones_like(rising)})


def kept(selection: SelectionInput, **settings) -> torch.Tensor:
    """The candidates kept [layers, heads, CHOSEN] (sinks and window left out), at pooling 1 and without the
    decode-time terms (these requests carry no keys or values)."""
    config = CompressionConfig.from_settings({"method": "infokv", "sinks": SINKS, "pooling_kernel": 1,
                                              "redundancy": 0.0, "value_norm": 0.0, **settings})
    indices = select_tokens(config.policy.scores(selection), KEEP, SINKS, WINDOW)
    return indices[..., SINKS:KEEP - WINDOW]


def top_k(length: int = LENGTH) -> torch.Tensor:
    end = length - WINDOW
    return torch.arange(end - CHOSEN, end).expand(LAYERS, HEADS, CHOSEN)


def distinct_sets(indices: torch.Tensor) -> int:
    return len({tuple(row.tolist()) for row in indices.flatten(0, 1)})


def test_the_default_is_the_deterministic_top_k():
    assert torch.equal(kept(request()), top_k())
    assert torch.equal(kept(request(), sample_temperature=0.0, sample_top_share=0.5), top_k())


def test_a_draw_is_reproducible_for_the_same_request_and_length():
    first, again = kept(request(), sample_temperature=0.3), kept(request(), sample_temperature=0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, kept(request("other"), sample_temperature=0.3))
    assert not torch.equal(first, kept(request(length=LENGTH - 1), sample_temperature=0.3))
    assert not torch.equal(first, kept(request(), sample_temperature=0.3, seed=1))


def test_every_layer_and_head_draws_its_own_set():
    assert distinct_sets(kept(request(), sample_temperature=0.3)) == LAYERS * HEADS


def test_a_low_temperature_is_the_top_k():
    assert torch.equal(kept(request(), sample_temperature=1e-4), top_k())


def test_a_higher_temperature_spreads_the_kept_sets():
    """The share of the top k kept, and the oldest candidate kept, fall as the temperature rises."""
    top = top_k()[0, 0]
    overlap, oldest = [], []
    for temperature in (0.01, 0.1, 0.3, 3.0):
        chosen = kept(request(), sample_temperature=temperature)
        overlap.append(torch.isin(chosen, top).float().mean().item())
        oldest.append(chosen.float().amin(dim=-1).mean().item())
    assert overlap == sorted(overlap, reverse=True) and overlap[0] > 0.9 and overlap[-1] < 0.5
    assert oldest == sorted(oldest, reverse=True) and oldest[-1] < 30


def test_the_top_share_keeps_the_top_tokens_and_draws_the_rest():
    top = round(0.5 * CHOSEN)
    chosen = kept(request(), sample_temperature=3.0, sample_top_share=0.5)
    best = top_k()[..., CHOSEN - top:]  # the highest-scored candidates, in every layer and head
    assert all(torch.isin(best[layer, head], chosen[layer, head]).all()
               for layer in range(LAYERS) for head in range(HEADS))
    assert distinct_sets(chosen) == LAYERS * HEADS  # the rest is drawn, per layer and head


def test_random_with_keep_prompt_keeps_the_prompt_and_draws_the_rest_per_layer_and_head():
    """Random Attention: `random` with `keep_prompt` (the scheduler protects the prompt as its sinks)."""
    config = CompressionConfig.from_settings({"method": "random", "keep_prompt": True, "sinks": SINKS})
    prompt = 120
    protected = config.protected_len(prompt)
    scores = config.policy.scores(request())
    indices = select_tokens(scores, protected + WINDOW + 20, protected, WINDOW)
    assert (indices[..., :prompt] == torch.arange(prompt)).all()
    assert distinct_sets(indices) == LAYERS * HEADS


@pytest.mark.parametrize("setting, value", [("sample_temperature", -0.1), ("sample_top_share", 1.5)])
def test_out_of_range_sampling_settings_are_refused(setting, value):
    from infokv_vllm.config import CompressionConfigError

    with pytest.raises(CompressionConfigError, match=setting.replace("_", "-")):
        CompressionConfig.from_settings({"method": "infokv", setting: value})
