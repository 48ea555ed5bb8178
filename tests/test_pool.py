"""The pool-wide mode's pure pieces: loss curves from scores and attention, how many pages the requests with a
curve owe, and the choice of kept lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infokv_vllm.core.pool import PoolCandidate, kept_lengths, pages_owed
from infokv_vllm.scoring import eviction_losses, select_tokens

SINKS, WINDOW = 2, 3


def test_loss_curve_is_the_attention_share_select_tokens_would_evict():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 20, generator=generator)
    mass = torch.rand(2, 3, 20, generator=generator) * 4
    losses = eviction_losses(scores, mass, SINKS, WINDOW)
    assert losses.shape == (20 - SINKS - WINDOW + 1,) and losses[0] == 0
    for evicted in range(len(losses)):
        keep = select_tokens(scores, 20 - evicted, SINKS, WINDOW)
        dropped = torch.ones_like(mass, dtype=torch.bool).scatter(-1, keep, False)
        expected = ((mass * dropped).sum(-1) / mass.sum(-1)).mean()
        assert losses[evicted].item() == pytest.approx(expected.item(), abs=1e-6)
    assert losses[-1] < 1  # sinks and window keep their share


def _curve(per_token: float, candidates: int) -> np.ndarray:
    """A request losing `per_token` attention per evicted slot."""
    return np.arange(candidates + 1, dtype=np.float32) * per_token


def test_pages_come_from_the_request_that_loses_least_per_page():
    ignored = PoolCandidate("ignored", physical_len=200, least_len=40, losses=_curve(0.001, 190))
    attended = PoolCandidate("attended", physical_len=200, least_len=40, losses=_curve(0.01, 190))
    kept = kept_lengths([ignored, attended], goal_blocks=5, block_size=16)
    # 200 slots are 13 pages: the first page freed is the partial one (200 -> 192), then whole pages.
    assert kept == {"ignored": 128}


def test_floors_stop_a_request_and_the_rest_come_from_the_next():
    ignored = PoolCandidate("ignored", physical_len=200, least_len=150, losses=_curve(0.001, 190))
    attended = PoolCandidate("attended", physical_len=200, least_len=40, losses=_curve(0.01, 190))
    kept = kept_lengths([ignored, attended], goal_blocks=5, block_size=16)
    assert kept == {"ignored": 160, "attended": 176}  # 3 pages down to the floor's page, then 2 more


def test_no_goal_frees_nothing_and_a_goal_beyond_the_floors_frees_what_they_allow():
    candidate = PoolCandidate("r", physical_len=100, least_len=40, losses=_curve(0.01, 90))
    assert kept_lengths([candidate], goal_blocks=0, block_size=16) == {}
    assert kept_lengths([candidate], goal_blocks=50, block_size=16) == {"r": 48}


def test_on_equal_losses_the_request_holding_more_pages_gives_first():
    short = PoolCandidate("short", physical_len=96, least_len=16, losses=_curve(0.0, 86))
    long = PoolCandidate("long", physical_len=160, least_len=16, losses=_curve(0.0, 150))
    # "long" gives 4 pages until both hold 6, then they alternate.
    assert kept_lengths([short, long], goal_blocks=6, block_size=16) == {"long": 80, "short": 80}


def test_requests_with_a_curve_owe_only_what_they_hold_above_their_share():
    # A batch arriving at once: two requests probed (60 and 4 pages), the others' curves a step away. The pool is
    # 200 pages over its target, but the two owe only their excess over 2 x 9 pages, down to 2 x (9 - 2).
    assert pages_owed(200, [60, 4], [3, 3], fair_share=9, room=2) == 50
    # Within their shares together (one above, one below), they owe nothing: no compaction at every new page.
    assert pages_owed(200, [11, 4], [3, 3], fair_share=9, room=2) == 0
    assert pages_owed(3, [60, 4], [3, 3], fair_share=9, room=2) == 3  # never more than the pool needs


def test_a_share_is_never_less_than_the_least_length_plus_the_room():
    # Requests that opted out hold the whole target: the fair share is 0. The two compressed requests, at their
    # least lengths (3 pages) plus one page each, owe nothing until they have grown their room (2 pages each)...
    assert pages_owed(20, [4, 4], [3, 3], fair_share=0, room=2) == 0
    assert pages_owed(20, [5, 5], [3, 3], fair_share=0, room=2) == 0
    # ... and then give back down to their least lengths.
    assert pages_owed(20, [6, 5], [3, 3], fair_share=0, room=2) == 5
