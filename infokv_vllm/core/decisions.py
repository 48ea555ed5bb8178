"""The scheduler's three rules, each deciding which running requests to compact, and to what length.

- `PerRequestBudgets`: a request longer than its budget once its prompt is processed is compressed to it; then
  (R-KV's decode schedule) whenever its kept length reaches budget + decode_interval, back to it;
- `PoolWideMode` (`--kv-pool-target`): requests are probed after their prompt and every decode interval, and the
  batch's KV is kept within the target share of the pool, the pages taken where the least observed attention is
  lost (`core/pool.py`);
- `MemoryPressure` (`--kv-memory-pressure`): when the running requests' next tokens need more blocks than the pool
  has free, requests are compressed (in the pool-wide mode the lowest-loss pages first, then to their floors),
  those holding the most slots above their budget first, before vLLM would preempt anyone.

Each reads the batch and applies its compactions through the scheduler (`SchedulerView`), which owns the
per-request state (`core/request_state.py`), the block manager and the tallies.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from vllm.utils.math_utils import cdiv

from infokv_vllm.config import CompressionConfig
from infokv_vllm.core.pool import PoolCandidate, kept_lengths, pages_owed
from infokv_vllm.messages import Compaction, Probe

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.request import Request

    from infokv_vllm.core.block_manager import CompactingAttentionManager
    from infokv_vllm.core.request_state import RequestState
    from infokv_vllm.metrics import CompressionStats


class SchedulerView(Protocol):
    """What the rules read of the scheduler, and what they do through it: apply a compaction (`_apply`, the one
    door every compaction goes through, which tests wrap to watch them)."""

    running: list[Request]
    requests: dict[str, Request]
    kv_cache_manager: KVCacheManager
    manager: CompactingAttentionManager
    totals: CompressionStats

    def state_of(self, request: Request) -> RequestState: ...

    def blocks_for_next_step(self, request: Request) -> int: ...

    def blocks_left_to_vllm(self, request_id: str) -> int: ...

    def _apply(self, compaction: Compaction, cause: str) -> Compaction | None: ...


def to_budget(request: Request, settings: CompressionConfig, physical: int, decoding: bool) -> Compaction:
    """A compaction of the request's `physical` slots down to its budget (its floor in the pool-wide mode), with
    the prompt's or the decode observation window."""
    logical, prompt = request.num_computed_tokens, request.num_prompt_tokens
    return Compaction(request.request_id, logical, physical, settings.budget_for(logical, prompt),
                      settings.protected_len(prompt),
                      settings.decode_window if decoding else settings.prefill_window, decoding)


class PerRequestBudgets:
    """Every compressed request keeps its own budget, whatever the others hold."""

    def decide(self, scheduler: SchedulerView) -> tuple[list[Compaction], list[Probe]]:
        """The step's compactions, applied; no probes."""
        decided = [c for request in scheduler.running if (c := self._decide(scheduler, request)) is not None]
        return [applied for compaction in decided
                if (applied := scheduler._apply(compaction, "decode" if compaction.decoding else "prompt"))
                ], []

    @staticmethod
    def _decide(scheduler: SchedulerView, request: Request) -> Compaction | None:
        state = scheduler.state_of(request)
        settings, logical = state.settings, request.num_computed_tokens
        if not settings.enabled:
            return None
        if logical < request.num_prompt_tokens:
            # Still prefilling (again, after a preemption): the prompt schedule applies once it is done.
            state.past_prompt = False
            return None
        physical = scheduler.manager.physical_len(request.request_id, logical)
        budget = settings.budget_for(logical, request.num_prompt_tokens)
        if not state.past_prompt:
            state.past_prompt = True
            if physical > budget:
                return to_budget(request, settings, physical, decoding=False)
        elif physical >= budget + settings.decode_interval:
            return to_budget(request, settings, physical, decoding=True)
        return None

    @staticmethod
    def window_start(scheduler: SchedulerView, request: Request, scheduled_tokens: int) -> int | None:
        """Where the observation window of the request's next compaction starts (logical), or None where none
        is coming."""
        state = scheduler.state_of(request)
        settings = state.settings
        if not state.past_prompt:
            prompt = request.num_prompt_tokens
            if prompt <= settings.budget_for(prompt, prompt):
                return None
            return prompt - settings.prefill_window
        logical = request.num_computed_tokens - scheduled_tokens
        trigger = settings.budget_for(logical, request.num_prompt_tokens) + settings.decode_interval
        return trigger - settings.decode_window + scheduler.manager.evicted.get(request.request_id, 0)


class PoolWideMode:
    """Budgets and ratios are floors; the batch's KV is kept within `pool_target` of the pool.

    Each compressed request is probed after its prompt and every decode interval after that (scored as a
    compaction would, the scores kept by the workers, a `LossCurve` reported). Whenever the running requests' KV
    and their next step's needs exceed the target, pages are taken where the least observed attention is lost
    per page, down to each request's floor, with room for every request to grow an interval before the next
    time. A compaction chooses with its request's last probe's scores (the slots computed since count as window),
    one step or more after the probe."""

    def __init__(self, pool_target: float, decode_interval: int) -> None:
        self.pool_target = pool_target
        self.decode_interval = decode_interval

    def decide(self, scheduler: SchedulerView) -> tuple[list[Compaction], list[Probe]]:
        """The step's probes, and the compactions (applied) that bring the batch back to the target."""
        probes = [probe for request in scheduler.running if (probe := self._due_probe(scheduler, request)) is not None]
        return self._meet_pool_target(scheduler, {probe.request_id for probe in probes}), probes

    @staticmethod
    def window_start(scheduler: SchedulerView, request: Request, scheduled_tokens: int) -> int:
        """Where the observation window of the request's next probe starts (logical)."""
        state = scheduler.state_of(request)
        if state.next_probe is None:
            return request.num_prompt_tokens - state.settings.prefill_window
        return state.next_probe - state.settings.decode_window

    @staticmethod
    def _due_probe(scheduler: SchedulerView, request: Request) -> Probe | None:
        """A probe of the request if it has reached its next probe point (the end of its prompt, then every decode
        interval); its observation window closed with the previous step."""
        request_id, logical = request.request_id, request.num_computed_tokens
        state = scheduler.state_of(request)
        settings = state.settings
        if not settings.enabled:
            return None
        if logical < request.num_prompt_tokens:  # still prefilling (again, after a preemption)
            state.forget_probes()
            return None
        decoding = state.next_probe is not None
        if logical < (request.num_prompt_tokens if state.next_probe is None else state.next_probe):
            return None
        state.next_probe = logical + settings.decode_interval
        state.drop_probe_scores()  # this probe replaces them
        physical = scheduler.manager.physical_len(request_id, logical)
        sinks = settings.protected_len(request.num_prompt_tokens)
        window = settings.decode_window if decoding else settings.prefill_window
        if physical <= sinks + window:
            return None  # nothing to choose from yet
        state.awaited_curve = logical
        return Probe(request_id, logical, physical, sinks, window, decoding)

    def _meet_pool_target(self, scheduler: SchedulerView, probed: set[str]) -> list[Compaction]:
        """When the running requests' KV plus their next step's needs exceed the target share of the pool, free
        the pages that lose the least, down to the target less room for every compressed request to grow one
        decode interval (so the batch is not compacted again at each step).

        Only requests with a loss curve can give pages, and requests still in their prompt, or waiting for their
        first curve, hold KV the target counts. So the requests with a curve give pages only once they hold more
        than their fair share (the target, less what uncompressed requests hold, split evenly over the compressed
        requests), and then down to it less their room: a batch that starts at once is not crushed into its first
        probed requests while the others' curves are a step away; the others give theirs when their curves
        arrive. A share is never less than the request's floor plus its room (`pages_owed`): where requests that
        opted out hold the whole target, the fair share is 0, and the compressed requests would otherwise be
        compacted at every page they grow into; they go down to their floors and grow their room again."""
        pool = scheduler.kv_cache_manager.block_pool
        usable = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
        target = int(self.pool_target * usable)
        needed = sum(map(scheduler.blocks_for_next_step, scheduler.running))
        over = usable - pool.get_num_free_blocks() + needed - target
        if over <= 0:
            return []
        # Blocks no compaction can free count against the target: every block of requests that opted out, and
        # what every request holds in a model's sliding-window and state groups.
        compressed, fixed_blocks = 0, 0
        for request in scheduler.running:
            fixed_blocks += scheduler.blocks_left_to_vllm(request.request_id)
            if scheduler.state_of(request).settings.enabled:
                compressed += 1
            else:
                fixed_blocks += len(scheduler.manager.req_to_blocks[request.request_id])
        room = min(target // 2, compressed * cdiv(self.decode_interval, scheduler.manager.block_size))
        return self.free_lowest_loss_pages(scheduler, over + room, probed, "pool target",
                                           fair_share=max(0, target - fixed_blocks) / max(compressed, 1),
                                           room=room / max(compressed, 1))

    @staticmethod
    def free_lowest_loss_pages(scheduler: SchedulerView, goal: int, excluded: set[str], cause: str,
                               fair_share: float | None = None, room: float = 0.0) -> list[Compaction]:
        """Compact the requests with a loss curve (not in `excluded`) to free `goal` pages where they lose the
        least attention (`core/pool.py`); fewer where floors stop it, or where a `fair_share` (pages per request,
        and the room each keeps to grow) says the candidates owe fewer (`pages_owed`). Returns the compactions
        applied."""
        manager = scheduler.manager
        candidates, windows = [], {}
        for request in scheduler.running:
            request_id, state = request.request_id, scheduler.state_of(request)
            curve = state.curve
            if curve is None or request_id in excluded:
                continue
            logical = request.num_computed_tokens
            physical = manager.physical_len(request_id, logical)
            windows[request_id] = curve.window + physical - curve.physical_len
            least = max(state.settings.budget_for(logical, request.num_prompt_tokens),
                        curve.sinks + windows[request_id])
            candidates.append(PoolCandidate(request_id, physical, least, curve.losses))
        if fair_share is not None:
            block_size = manager.block_size
            goal = pages_owed(goal, [cdiv(candidate.physical_len, block_size) for candidate in candidates],
                              [cdiv(candidate.least_len, block_size) for candidate in candidates], fair_share, room)
        compactions = []
        physical_lens = {candidate.request_id: candidate.physical_len for candidate in candidates}
        for request_id, kept in kept_lengths(candidates, goal, manager.block_size).items():
            request = scheduler.requests[request_id]
            state = scheduler.state_of(request)
            curve, physical = state.curve, physical_lens[request_id]
            compaction = scheduler._apply(
                Compaction(request_id, request.num_computed_tokens, physical, kept, curve.sinks,
                           windows[request_id], decoding=True, probed=True), cause)
            if compaction is None:
                continue
            evicted = physical - kept
            scheduler.totals.count_attention_lost(float(curve.losses[evicted]))
            state.curve = dataclasses.replace(curve, physical_len=curve.physical_len - evicted,
                                              losses=curve.losses[evicted:] - curve.losses[evicted])
            compactions.append(compaction)
        return compactions


class MemoryPressure:
    """Compress requests before vLLM would preempt one for want of free blocks: in the pool-wide mode the
    lowest-loss pages first, then each request to its budget, those holding the most slots above it first."""

    def __init__(self, pool_wide: PoolWideMode | None) -> None:
        self.pool_wide = pool_wide

    def relieve(self, scheduler: SchedulerView, already_compacted: set[str]) -> list[Compaction]:
        """The compactions (applied) that free the blocks the running requests' next tokens need, sparing the
        requests compacted or probed in this step already."""
        compactions = []
        pool = scheduler.kv_cache_manager.block_pool
        needed = sum(map(scheduler.blocks_for_next_step, scheduler.running))
        if self.pool_wide is not None and needed > pool.get_num_free_blocks():
            # The lowest-loss pages across the batch first; requests without a curve yet go to their floor below.
            compactions = self.pool_wide.free_lowest_loss_pages(
                scheduler, needed - pool.get_num_free_blocks(), already_compacted, "memory pressure")
            already_compacted = already_compacted | {c.request_id for c in compactions}
        candidates = []
        for request in scheduler.running:
            logical = request.num_computed_tokens
            settings = scheduler.state_of(request).settings
            if request.request_id in already_compacted or logical < request.num_prompt_tokens \
                    or not settings.enabled:
                continue
            excess = (scheduler.manager.physical_len(request.request_id, logical)
                      - settings.budget_for(logical, request.num_prompt_tokens))
            if excess > 0:
                candidates.append((excess, request))
        for _, request in sorted(candidates, key=lambda item: -item[0]):
            if needed <= pool.get_num_free_blocks():
                break
            physical = scheduler.manager.physical_len(request.request_id, request.num_computed_tokens)
            compaction = scheduler._apply(
                to_budget(request, scheduler.state_of(request).settings, physical, decoding=True), "memory pressure")
            if compaction is not None:
                compactions.append(compaction)
        return compactions
