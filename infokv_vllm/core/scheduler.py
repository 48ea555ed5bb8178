"""The scheduler extension: decides when, and to what length, each running request is compressed.

Compression is decided here, before vLLM allocates the step's slots, so the tail pages a compaction frees serve
this very step. The decision travels to every worker on the `SchedulerOutput` (`messages.StepPlan`); the
workers choose *which* tokens with the active scoring policy and move them before the step's forward, so every
tensor-parallel rank compacts to the same lengths.

Budgets are per request: the server's settings, overridden by what a request gives in its `extra_args` (the
OpenAI API's `vllm_xargs`, see `CompressionConfig.for_request`; the frontend has already refused bad values).
Workers need no per-request settings: every length they use arrives in the plan.

Schedules (docs/method.md, "Selection, schedules and budgets"):
- prefill: once the prompt is processed, a request longer than its budget is compressed to it;
- decode (R-KV): whenever the kept length reaches budget + decode_interval, it is compressed back to budget;
- memory pressure (opt-in): when the running requests' next tokens need more blocks than the pool has free,
  requests are compressed to their budget, those holding the most slots above it first, before vLLM would
  preempt anyone.

Pool-wide mode (`--kv-pool-target`, opt-in): budgets and ratios are floors, and compactions come from the batch.
Each compressed request is probed after its prompt and every decode interval after that (scored as a compaction
would, the scores kept by the workers, a `LossCurve` reported). Whenever the running requests' KV and their next
step's needs exceed the target share of the pool, pages are taken where the least observed attention is lost per
page (`core/pool.py`), down to each request's floor, with room for every request to grow an interval before the
next time; memory pressure takes pages the same way first. A compaction chooses with its request's last probe's
scores (the slots computed since count as window), one step or more after the probe.

With prefix caching on, a request's computed blocks are hashed just before its first compaction (so the next
request with the same prefix reuses them), and the block manager gives every cached or shared block the
compaction would rewrite a private copy (`core/block_manager.py`).

Asynchronous scheduling (vLLM's GPU default): vLLM schedules step N+1 while step N runs, so a request's
`num_computed_tokens` already counts the tokens N is computing. Deciding on it is what the synchronous schedule
decides one step later, with the same numbers: the workers run the steps in order (on a GPU, on one stream), so a
compaction in N+1 moves KV and signals that N has written, and the slots it frees are written only by later
steps. Nothing a decision needs comes back with N's output: the signals stay on the workers. Only the pool-wide
mode's loss curves do, and they arrive a step later (a compaction uses the probe's scores, whenever it comes). A
curve is kept only if it answers the probe its request still awaits (`LossCurve.logical_len`): a compaction that
scored the request afresh (memory pressure), a preemption or an abort decided in between made the workers drop the
scores it describes, and a probed compaction with it would choose with scores no worker holds.
`CompressingScheduler` becomes `CompressingAsyncScheduler` (over vLLM's `AsyncScheduler`) when the engine
schedules asynchronously: vLLM picks its own async class only for the default scheduler.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from infokv_vllm import logger
from infokv_vllm.config import CompressionConfig, compression_of
from infokv_vllm.core.block_manager import CompactingAttentionManager
from infokv_vllm.core.pool import PoolCandidate, kept_lengths, pages_owed
from infokv_vllm.messages import Compaction, LossCurve, Probe, StepPlan, attach_plan, report_of
from infokv_vllm.metrics import CompressionSchedulerStats, CompressionStats
from infokv_vllm.signals import ATTENTION



@dataclass
class CompressionRecord:
    """What compression did to one request, for the log line when it finishes."""

    events: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0
    peak_slots: int = 0  # the most KV slots it held (before a compaction, or when it finished)


class CompressingScheduler(Scheduler):
    def __new__(cls, *args, **kwargs):
        # vLLM instantiates the configured class by name, and resolves `async_scheduling` after the plugin names
        # it: the asynchronous variant is chosen here, where the resolved config arrives.
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        if cls is CompressingScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = CompressingAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compression = compression_of(self.vllm_config)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1 or not isinstance(managers[0], CompactingAttentionManager):
            raise RuntimeError(
                "infokv-vllm: compression needs exactly one KV cache group managed by CompactingAttentionManager, "
                f"found {[type(m).__name__ for m in managers]}; the model runner did not report "
                "CompressedAttentionSpec layers")
        self.manager: CompactingAttentionManager = managers[0]
        self.manager.compresses = lambda request_id: self.settings_of(self.requests[request_id]).enabled
        self._scores_attention = ATTENTION in self.compression.policy.signals
        self.records: dict[str, CompressionRecord] = {}
        self.totals = CompressionStats()  # since start-up; the frontend's metrics derive from it
        self._past_prompt: set[str] = set()  # requests whose prompt-compression point has been evaluated
        self._settings: dict[str, CompressionConfig] = {}  # per request: the server's, as the request overrides
        # Pool-wide mode, per request: the logical length of its next probe (absent: the end of its prompt); that
        # of the probe whose curve is on its way (sent to the workers, not reported yet); and its last probe's
        # curve, shortened by the compactions since (absent until the probe's report arrives)
        self._next_probe: dict[str, int] = {}
        self._awaited_curves: dict[str, int] = {}
        self._curves: dict[str, LossCurve] = {}

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        probes: list[Probe] = []
        if self.compression.pool_wide:
            probes = [probe for request in self.running if (probe := self._due_probe(request)) is not None]
            compactions = self._meet_pool_target({probe.request_id for probe in probes})
        else:
            decided = [c for request in self.running if (c := self._decide(request)) is not None]
            compactions = [applied for compaction in decided
                           if (applied := self._apply(compaction, "decode" if compaction.decoding else "prompt"))]
        if self.compression.memory_pressure:
            compactions += self._relieve_memory_pressure(
                {c.request_id for c in compactions} | {probe.request_id for probe in probes})
        output = super().schedule(*args, **kwargs)
        if not self.requests:
            # Every request has finished (this step hands the last of them to the workers): the per-request state
            # must be empty (the soak benchmark reads this line).
            logger.debug("infokv: idle scheduler holds per-request state of %s", self.requests_held())
        # A request preempted later in this same schedule() lost all its blocks: nothing is left to move or score.
        attach_plan(output, StepPlan(
            compactions=[c for c in compactions if c.request_id not in output.preempted_req_ids],
            probes=[probe for probe in probes if probe.request_id not in output.preempted_req_ids],
            window_starts=self._window_starts(output) if self._scores_attention else {}))
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output, *args, **kwargs):
        # Before vLLM's bookkeeping, which frees the requests that finish in this step (and their curves).
        report = report_of(model_runner_output)
        if report is not None:
            self.totals.seconds_scoring += report.seconds_scoring
            self.totals.seconds_compacting += report.seconds_compacting
            for request_id, curve in report.loss_curves.items():
                self._accept_curve(request_id, curve)
        return super().update_from_output(scheduler_output, model_runner_output, *args, **kwargs)

    def make_stats(self, *args, **kwargs) -> CompressionSchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is None:
            return None
        logical = [request.num_computed_tokens for request in self.running]
        kept = [self.manager.physical_len(request.request_id, length) for request, length in zip(self.running, logical)]
        compressed = tuple(length for request, length in zip(self.running, kept)
                           if self.settings_of(request).enabled)
        return CompressionSchedulerStats.extend(stats, dataclasses.replace(
            self.totals, kept_tokens=sum(kept), logical_tokens=sum(logical), kept_tokens_per_request=compressed))

    def _window_starts(self, output: SchedulerOutput) -> dict[str, int]:
        """For requests whose tokens this step fall in the next compaction's observation window: the logical
        position where that window starts (the workers score only queries from there on)."""
        starts = {}
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            settings = self.settings_of(request)
            if not settings.enabled:
                continue
            end = request.num_computed_tokens  # already advanced past this step's tokens
            if self.compression.pool_wide:
                due = self._next_probe.get(request_id)
                start = (request.num_prompt_tokens - settings.prefill_window if due is None
                         else due - settings.decode_window)
            elif request_id not in self._past_prompt:
                prompt = request.num_prompt_tokens
                if prompt <= settings.budget_for(prompt, prompt):
                    continue
                start = prompt - settings.prefill_window
            else:
                logical = end - num_tokens
                trigger = settings.budget_for(logical, request.num_prompt_tokens) + settings.decode_interval
                start = trigger - settings.decode_window + self.manager.evicted.get(request_id, 0)
            if end > start:
                starts[request_id] = start
        return starts

    def requests_held(self) -> dict[str, int]:
        """How many requests each piece of the scheduler's per-request compression state holds."""
        return {"records": len(self.records), "past_prompt": len(self._past_prompt),
                "settings": len(self._settings),
                "evicted": len(self.manager.evicted), "next_probe": len(self._next_probe),
                "awaited_curves": len(self._awaited_curves), "curves": len(self._curves)}

    def settings_of(self, request: Request) -> CompressionConfig:
        """The compression settings of one request: the server's, with the request's own overrides."""
        settings = self._settings.get(request.request_id)
        if settings is None:
            extra_args = request.sampling_params.extra_args if request.sampling_params is not None else None
            settings = self._settings[request.request_id] = self.compression.for_request(extra_args)
        return settings

    def _decide(self, request: Request) -> Compaction | None:
        settings = self.settings_of(request)
        logical = request.num_computed_tokens
        if not settings.enabled:
            return None
        if logical < request.num_prompt_tokens:
            # Still prefilling (again, after a preemption): the prompt schedule applies once it is done.
            self._past_prompt.discard(request.request_id)
            return None
        physical = self.manager.physical_len(request.request_id, logical)
        budget = settings.budget_for(logical, request.num_prompt_tokens)
        if request.request_id not in self._past_prompt:
            self._past_prompt.add(request.request_id)
            if physical > budget:
                return self._to_budget(request, settings, physical, decoding=False)
        elif physical >= budget + settings.decode_interval:
            return self._to_budget(request, settings, physical, decoding=True)
        return None

    @staticmethod
    def _to_budget(request: Request, settings: CompressionConfig, physical: int, decoding: bool) -> Compaction:
        """A compaction of the request's `physical` slots down to its budget (its floor in the pool-wide mode),
        with the prompt's or the decode observation window."""
        logical, prompt = request.num_computed_tokens, request.num_prompt_tokens
        return Compaction(request.request_id, logical, physical, settings.budget_for(logical, prompt),
                          settings.protected_len(prompt),
                          settings.decode_window if decoding else settings.prefill_window, decoding)

    # --- the pool-wide mode -------------------------------------------------------------------------------

    def _due_probe(self, request: Request) -> Probe | None:
        """A probe of the request if it has reached its next probe point (the end of its prompt, then every decode
        interval); its observation window closed with the previous step."""
        request_id, logical = request.request_id, request.num_computed_tokens
        settings = self.settings_of(request)
        if not settings.enabled:
            return None
        if logical < request.num_prompt_tokens:  # still prefilling (again, after a preemption)
            self._forget_probes(request_id)
            return None
        decoding = request_id in self._next_probe
        if logical < self._next_probe.get(request_id, request.num_prompt_tokens):
            return None
        self._next_probe[request_id] = logical + settings.decode_interval
        self._drop_probe_scores(request_id)  # this probe replaces them
        physical = self.manager.physical_len(request_id, logical)
        sinks = settings.protected_len(request.num_prompt_tokens)
        window = settings.decode_window if decoding else settings.prefill_window
        if physical <= sinks + window:
            return None  # nothing to choose from yet
        self._awaited_curves[request_id] = logical
        return Probe(request_id, logical, physical, sinks, window, decoding)

    def _accept_curve(self, request_id: str, curve: LossCurve) -> None:
        """Keep a reported curve if it answers the probe the request awaits. Under asynchronous scheduling it
        arrives after the next step's decisions, which may have made the workers drop the probe's scores (a
        compaction that scored afresh, a preemption, the request's end) or sent a newer probe."""
        if self._awaited_curves.get(request_id) == curve.logical_len:
            del self._awaited_curves[request_id]
            self._curves[request_id] = curve

    def _drop_probe_scores(self, request_id: str) -> None:
        """The workers no longer hold the request's probe scores: neither its curve nor the one on its way says
        what a probed compaction would evict."""
        self._curves.pop(request_id, None)
        self._awaited_curves.pop(request_id, None)

    def _forget_probes(self, request_id: str) -> None:
        """The request lost its KV (it finished, or it is recomputed after a preemption): it is probed again from
        the end of its prompt."""
        self._next_probe.pop(request_id, None)
        self._drop_probe_scores(request_id)

    def _meet_pool_target(self, probed: set[str]) -> list[Compaction]:
        """Pool-wide mode: when the running requests' KV plus their next step's needs exceed the target share of
        the pool, free the pages that lose the least, down to the target less room for every compressed request
        to grow one decode interval (so the batch is not compacted again at each step).

        Only requests with a loss curve can give pages, and requests still in their prompt, or waiting for their
        first curve, hold KV the target counts. So the requests with a curve give pages only once they hold more
        than their fair share (the target, less what uncompressed requests hold, split evenly over the compressed
        requests), and then down to it less their room: a batch that starts at once is not crushed into its first
        probed requests while the others' curves are a step away; the others give theirs when their curves
        arrive. A share is never less than the request's floor plus its room (`pages_owed`): where requests that
        opted out hold the whole target, the fair share is 0, and the compressed requests would otherwise be
        compacted at every page they grow into; they go down to their floors and grow their room again."""
        pool = self.kv_cache_manager.block_pool
        usable = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
        target = int(self.compression.pool_target * usable)
        needed = sum(map(self._blocks_for_next_step, self.running))
        over = usable - pool.get_num_free_blocks() + needed - target
        if over <= 0:
            return []
        compressed, uncompressed_blocks = 0, 0
        for request in self.running:
            if self.settings_of(request).enabled:
                compressed += 1
            else:
                uncompressed_blocks += len(self.manager.req_to_blocks[request.request_id])
        room = min(target // 2, compressed * cdiv(self.compression.decode_interval, self.manager.block_size))
        return self._free_lowest_loss_pages(over + room, probed, "pool target",
                                            fair_share=max(0, target - uncompressed_blocks) / max(compressed, 1),
                                            room=room / max(compressed, 1))

    def _free_lowest_loss_pages(self, goal: int, excluded: set[str], cause: str, fair_share: float | None = None,
                                room: float = 0.0) -> list[Compaction]:
        """Compact the requests with a loss curve (not in `excluded`) to free `goal` pages where they lose the
        least attention (`core/pool.py`); fewer where floors stop it, or where a `fair_share` (pages per request,
        and the room each keeps to grow) says the candidates owe fewer (`pages_owed`)."""
        candidates, windows = [], {}
        for request in self.running:
            request_id = request.request_id
            curve = self._curves.get(request_id)
            if curve is None or request_id in excluded:
                continue
            logical = request.num_computed_tokens
            physical = self.manager.physical_len(request_id, logical)
            windows[request_id] = curve.window + physical - curve.physical_len
            least = max(self.settings_of(request).budget_for(logical, request.num_prompt_tokens),
                        curve.sinks + windows[request_id])
            candidates.append(PoolCandidate(request_id, physical, least, curve.losses))
        if fair_share is not None:
            block_size = self.manager.block_size
            goal = pages_owed(goal, [cdiv(candidate.physical_len, block_size) for candidate in candidates],
                              [cdiv(candidate.least_len, block_size) for candidate in candidates], fair_share, room)
        compactions = []
        physical_lens = {candidate.request_id: candidate.physical_len for candidate in candidates}
        for request_id, kept in kept_lengths(candidates, goal, self.manager.block_size).items():
            curve, physical = self._curves[request_id], physical_lens[request_id]
            compaction = self._apply(Compaction(request_id, self.requests[request_id].num_computed_tokens, physical,
                                                kept, curve.sinks, windows[request_id], decoding=True, probed=True),
                                     cause)
            if compaction is None:
                continue
            evicted = physical - kept
            self.totals.count_attention_lost(float(curve.losses[evicted]))
            self._curves[request_id] = dataclasses.replace(curve, physical_len=curve.physical_len - evicted,
                                                           losses=curve.losses[evicted:] - curve.losses[evicted])
            compactions.append(compaction)
        return compactions

    def _relieve_memory_pressure(self, already_compacted: set[str]) -> list[Compaction]:
        compactions = []
        pool = self.kv_cache_manager.block_pool
        needed = sum(map(self._blocks_for_next_step, self.running))
        if self.compression.pool_wide and needed > pool.get_num_free_blocks():
            # The lowest-loss pages across the batch first; requests without a curve yet go to their floor below.
            compactions = self._free_lowest_loss_pages(needed - pool.get_num_free_blocks(), already_compacted,
                                                       "memory pressure")
            already_compacted = already_compacted | {c.request_id for c in compactions}
        candidates = []
        for request in self.running:
            logical = request.num_computed_tokens
            settings = self.settings_of(request)
            if request.request_id in already_compacted or logical < request.num_prompt_tokens \
                    or not settings.enabled:
                continue
            excess = (self.manager.physical_len(request.request_id, logical)
                      - settings.budget_for(logical, request.num_prompt_tokens))
            if excess > 0:
                candidates.append((excess, request))
        for _, request in sorted(candidates, key=lambda item: -item[0]):
            if needed <= pool.get_num_free_blocks():
                break
            physical = self.manager.physical_len(request.request_id, request.num_computed_tokens)
            compaction = self._apply(self._to_budget(request, self.settings_of(request), physical, decoding=True),
                                     "memory pressure")
            if compaction is not None:
                compactions.append(compaction)
        return compactions

    def _blocks_for_next_step(self, request: Request) -> int:
        """Blocks the request still needs for the tokens it would compute next (at most one full chunk)."""
        logical = request.num_computed_tokens
        pending = request.num_tokens_with_spec + request.num_output_placeholders - logical
        pending = min(pending, self.scheduler_config.max_num_batched_tokens)
        needed = cdiv(self.manager.physical_len(request.request_id, logical) + pending, self.manager.block_size)
        return max(0, needed - len(self.manager.req_to_blocks[request.request_id]))

    def _apply(self, compaction: Compaction, cause: str) -> Compaction | None:
        """Compact in the block manager now; the workers move the KV before the step's forward. Returns the
        compaction with the block copies the workers make first, or None where the manager could not make them.
        `cause` (prompt, decode, memory pressure) goes into the debug line: under memory pressure a request is
        compressed when the batch needs it, so its tokens depend on the other requests."""
        request_id = compaction.request_id
        if compaction.logical_len == compaction.physical_len:
            # The first compaction: the prefix cache gets the request's computed blocks while they still hold
            # its tokens in order (they are never hashed after it).
            self.kv_cache_manager.coordinator.cache_blocks(self.requests[request_id], compaction.logical_len)
        blocks = self.manager.compact(request_id, compaction.physical_len, compaction.kept_len, compaction.sinks)
        if blocks is None:
            logger.debug("infokv: request %s not compressed (%s): no free block to copy a shared one into",
                         request_id, cause)
            return None
        if not compaction.probed:
            self._drop_probe_scores(request_id)  # the workers score it afresh, and drop the probe's scores
        evicted = compaction.physical_len - compaction.kept_len
        record = self.records.setdefault(request_id, CompressionRecord())
        record.peak_slots = max(record.peak_slots, compaction.physical_len)
        for tally in (record, self.totals):
            tally.events += 1
            tally.tokens_evicted += evicted
            tally.blocks_freed += blocks.freed
        logger.debug("infokv: request %s compressed %d -> %d KV tokens (logical %d, %s), %d blocks freed, %d "
                     "copied", request_id, compaction.physical_len, compaction.kept_len, compaction.logical_len,
                     cause, blocks.freed, len(blocks.copies))
        return dataclasses.replace(compaction, copies=blocks.copies)

    def _preempt_request(self, request: Request, *args, **kwargs) -> None:
        self._forget_probes(request.request_id)
        # A preempted request is recomputed in full and compressed afresh, so its tokens depend on the batch.
        logger.debug("infokv: request %s preempted after %d compressions", request.request_id,
                     self.records[request.request_id].events if request.request_id in self.records else 0)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args, **kwargs):
        self._past_prompt.discard(request.request_id)
        self._forget_probes(request.request_id)
        record = self.records.pop(request.request_id, None)
        if self.settings_of(request).enabled:
            record = record or CompressionRecord()
            held = self.manager.physical_len(request.request_id, request.num_computed_tokens)
            logger.debug("infokv: request %s finished after %d compressions: %d tokens evicted, %d blocks "
                         "freed, peak %d KV slots", request.request_id, record.events, record.tokens_evicted,
                         record.blocks_freed, max(record.peak_slots, held))
        self._settings.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


class CompressingAsyncScheduler(CompressingScheduler, AsyncScheduler):
    """`CompressingScheduler` over vLLM's `AsyncScheduler` (output placeholders, caching on output), for engines
    that schedule the next step while the current one runs (see the module's docstring)."""
