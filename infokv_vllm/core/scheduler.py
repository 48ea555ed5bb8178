"""The scheduler extension: decides when, and to what length, each running request is compressed.

Compression is decided here, before vLLM allocates the step's slots, so the tail pages a compaction frees serve
this very step. The decision travels to every worker on the `SchedulerOutput` (`messages.StepPlan`); the
workers choose *which* tokens with the active scoring policy and move them before the step's forward, so every
tensor-parallel rank compacts to the same lengths.

Budgets are per request: the server's settings, overridden by what a request gives in its `extra_args` (the
OpenAI API's `vllm_xargs`, see `CompressionConfig.for_request`; the frontend has already refused bad values).
Workers need no per-request settings: every length they use arrives in the plan.

The rules (docs/method.md, "Selection, schedules and budgets") are decision objects in `core/decisions.py`: per
request budgets (the prompt, then R-KV's decode schedule) or the pool-wide mode (`--kv-pool-target`), and memory
pressure (opt-in). This class holds each request's state (`core/request_state.py`: one `RequestState`, dropped
when vLLM frees the request), applies the rules' compactions in the block manager, and carries the plan to the
workers and the workers' reports back.

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

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from infokv_vllm import logger
from infokv_vllm.config import compression_of
from infokv_vllm.core.block_manager import CompactingAttentionManager
from infokv_vllm.core.decisions import MemoryPressure, PerRequestBudgets, PoolWideMode
from infokv_vllm.core.request_state import RequestState
from infokv_vllm.messages import Compaction, StepPlan, attach_plan, report_of
from infokv_vllm.metrics import CompressionSchedulerStats, CompressionStats
from infokv_vllm.signals import ATTENTION


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
        # The full-attention layers' group; a model's sliding-window and state groups keep vLLM's own managers.
        managers = self.kv_cache_manager.coordinator.single_type_managers
        compacting = [manager for manager in managers if isinstance(manager, CompactingAttentionManager)]
        if len(compacting) != 1:
            raise RuntimeError(
                "infokv-vllm: compression needs exactly one KV cache group managed by CompactingAttentionManager, "
                f"found {[type(m).__name__ for m in managers]}; the model runner did not report "
                "CompressedAttentionSpec layers")
        self.manager: CompactingAttentionManager = compacting[0]
        self.other_managers = [manager for manager in managers if manager is not self.manager]
        self.manager.compresses = lambda request_id: self.state_of(self.requests[request_id]).settings.enabled
        self._scores_attention = ATTENTION in self.compression.policy.signals
        self.totals = CompressionStats()  # since start-up; the frontend's metrics derive from it
        self.request_states: dict[str, RequestState] = {}
        pool_wide = (PoolWideMode(self.compression.pool_target, self.compression.decode_interval)
                     if self.compression.pool_wide else None)
        self.rule: PerRequestBudgets | PoolWideMode = pool_wide or PerRequestBudgets()
        self.memory_pressure = MemoryPressure(pool_wide) if self.compression.memory_pressure else None

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        compactions, probes = self.rule.decide(self)
        if self.memory_pressure is not None:
            compactions += self.memory_pressure.relieve(
                self, {c.request_id for c in compactions} | {probe.request_id for probe in probes})
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
                state = self.request_states.get(request_id)
                if state is not None:  # a request aborted with its probe in flight has no state left
                    state.accept_curve(curve)
        return super().update_from_output(scheduler_output, model_runner_output, *args, **kwargs)

    def make_stats(self, *args, **kwargs) -> CompressionSchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is None:
            return None
        logical = [request.num_computed_tokens for request in self.running]
        kept = [self.manager.physical_len(request.request_id, length) for request, length in zip(self.running, logical)]
        compressed = tuple(length for request, length in zip(self.running, kept)
                           if self.state_of(request).settings.enabled)
        return CompressionSchedulerStats.extend(stats, dataclasses.replace(
            self.totals, kept_tokens=sum(kept), logical_tokens=sum(logical), kept_tokens_per_request=compressed))

    def _window_starts(self, output: SchedulerOutput) -> dict[str, int]:
        """For requests whose tokens this step fall in the next compaction's (or probe's) observation window: the
        logical position where that window starts (the workers score only queries from there on)."""
        starts = {}
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            if not self.state_of(request).settings.enabled:
                continue
            start = self.rule.window_start(self, request, num_tokens)
            # num_computed_tokens has already advanced past this step's tokens
            if start is not None and request.num_computed_tokens > start:
                starts[request_id] = start
        return starts

    def requests_held(self) -> dict[str, int]:
        """How many requests each piece of the scheduler's per-request compression state holds."""
        return {"request_states": len(self.request_states), "evicted": len(self.manager.evicted)}

    def state_of(self, request: Request) -> RequestState:
        """The request's compression state, made the first time the scheduler looks at the request (when the
        block manager first allocates for it) with its settings: the server's, with the request's overrides."""
        state = self.request_states.get(request.request_id)
        if state is None:
            extra_args = request.sampling_params.extra_args if request.sampling_params is not None else None
            state = self.request_states[request.request_id] = RequestState(self.compression.for_request(extra_args))
        return state

    def blocks_for_next_step(self, request: Request) -> int:
        """Blocks the request still needs for the tokens it would compute next (at most one full chunk), in every
        KV cache group: the compressed one at its kept length, the others as vLLM's managers count them."""
        request_id, logical = request.request_id, request.num_computed_tokens
        pending = request.num_tokens_with_spec + request.num_output_placeholders - logical
        pending = min(pending, self.scheduler_config.max_num_batched_tokens)
        needed = cdiv(self.manager.physical_len(request_id, logical) + pending, self.manager.block_size)
        elsewhere = sum(manager.get_num_blocks_to_allocate(request_id, logical + pending, (), logical, logical,
                                                           logical + pending)
                        for manager in self.other_managers)
        return max(0, needed - len(self.manager.req_to_blocks[request_id])) + elsewhere

    def blocks_left_to_vllm(self, request_id: str) -> int:
        """Blocks the request holds in a model's sliding-window and state groups, which compression leaves to
        vLLM (its sliding-window manager replaces blocks that left the window by the null block)."""
        return sum(not block.is_null for manager in self.other_managers
                   for block in manager.req_to_blocks.get(request_id, ()))

    def _apply(self, compaction: Compaction, cause: str) -> Compaction | None:
        """Compact in the block manager now; the workers move the KV before the step's forward. Returns the
        compaction with the block copies the workers make first, or None where the manager could not make them.
        `cause` (prompt, decode, memory pressure, pool target) goes into the debug line: under memory pressure a
        request is compressed when the batch needs it, so its tokens depend on the other requests."""
        request_id = compaction.request_id
        request = self.requests[request_id]
        if compaction.logical_len == compaction.physical_len:
            # The first compaction: the prefix cache gets the request's computed blocks while they still hold
            # its tokens in order (they are never hashed after it).
            self.kv_cache_manager.coordinator.cache_blocks(request, compaction.logical_len)
        blocks = self.manager.compact(request_id, compaction.physical_len, compaction.kept_len, compaction.sinks)
        if blocks is None:
            logger.debug("infokv: request %s not compressed (%s): no free block to copy a shared one into",
                         request_id, cause)
            return None
        state = self.state_of(request)
        if not compaction.probed:
            state.drop_probe_scores()  # the workers score it afresh, and drop the probe's scores
        evicted = compaction.physical_len - compaction.kept_len
        record = state.record
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
        state = self.state_of(request)
        state.forget_probes()
        # A preempted request is recomputed in full and compressed afresh, so its tokens depend on the batch.
        logger.debug("infokv: request %s preempted after %d compressions", request.request_id, state.record.events)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args, **kwargs):
        # The one place a request's compression state is dropped: finish, abort and a finished stream all end here.
        state = self.state_of(request)
        del self.request_states[request.request_id]
        if state.settings.enabled:
            record = state.record
            held = self.manager.physical_len(request.request_id, request.num_computed_tokens)
            logger.debug("infokv: request %s finished after %d compressions: %d tokens evicted, %d blocks "
                         "freed, peak %d KV slots", request.request_id, record.events, record.tokens_evicted,
                         record.blocks_freed, max(record.peak_slots, held))
        return super()._free_request(request, *args, **kwargs)


class CompressingAsyncScheduler(CompressingScheduler, AsyncScheduler):
    """`CompressingScheduler` over vLLM's `AsyncScheduler` (output placeholders, caching on output), for engines
    that schedule the next step while the current one runs (see the module's docstring)."""
