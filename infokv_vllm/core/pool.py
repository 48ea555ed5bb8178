"""The pool-wide mode's choice: which running requests give up pages when the batch's KV exceeds its target.

Every compressed request carries the `LossCurve` of its last probe: the share of its observation window's
attention that evicting its e lowest-scored slots would lose. A share of attention means the same in every
request, so a page of one request compares with a page of another: the pages go where the least attention is lost
per page freed (greedy water-filling over page-aligned lengths), down to no request's least length (its floor,
its sinks and window). A request whose window ignores its history gives up more than one whose window reads it.

Only requests with a curve can give pages, while the target counts every request's KV; `pages_owed` keeps the
first requests probed in a batch that arrives at once from paying for the others, whose curves are a step away.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
from vllm.utils.math_utils import cdiv


@dataclass(frozen=True)
class PoolCandidate:
    """One request the pool-wide mode may compact now."""

    request_id: str
    physical_len: int  # slots it holds
    least_len: int  # slots it keeps at the least (its floor; sinks and window)
    losses: np.ndarray  # `LossCurve.losses`: what evicting e of its probed slots loses


def kept_lengths(candidates: list[PoolCandidate], goal_blocks: int, block_size: int) -> dict[str, int]:
    """Page-aligned kept lengths, per request that gives up pages, freeing at least `goal_blocks` pages (fewer
    where every request is at its least length), one page at a time from the request whose next page loses the
    least attention; ties go to the request holding more pages."""
    by_id = {candidate.request_id: candidate for candidate in candidates}
    heap: list[tuple[float, int, str, int]] = []

    def offer(candidate: PoolCandidate, length: int) -> None:
        shorter = (cdiv(length, block_size) - 1) * block_size
        if shorter >= candidate.least_len:
            losses, physical = candidate.losses, candidate.physical_len
            loss = losses[physical - shorter] - losses[physical - length]
            heapq.heappush(heap, (float(loss), -cdiv(length, block_size), candidate.request_id, shorter))

    for candidate in candidates:
        offer(candidate, candidate.physical_len)
    kept: dict[str, int] = {}
    freed = 0
    while freed < goal_blocks and heap:
        _, _, request_id, length = heapq.heappop(heap)
        kept[request_id] = length
        freed += 1
        offer(by_id[request_id], length)
    return kept


def pages_owed(goal_blocks: int, held_blocks: list[int], least_blocks: list[int], fair_share: float,
               room: float) -> int:
    """How many of `goal_blocks` the candidates (holding `held_blocks` pages each, `least_blocks` at the least)
    give: none while together they hold no more than their shares, then down to their shares less `room` each
    (so they grow `room` pages before they give again), and never more than the goal. The water-filling still
    decides which of them gives.

    A candidate's share is `fair_share`, but never less than its least pages plus the room: where the target
    leaves the compressed requests less than that (requests that opted out hold it), they go down to their least
    lengths and grow a room again, instead of giving back every page they cross into."""
    shares = sum(max(fair_share, least + room) for least in least_blocks)
    held = sum(held_blocks)
    if held <= shares:
        return 0
    return min(goal_blocks, math.ceil(held - shares + room * len(held_blocks)))
