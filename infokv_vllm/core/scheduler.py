"""The scheduler extension: decides when, and to what length, each running request is compressed.

Compression is decided here, before vLLM allocates the step's slots, so the tail pages a compaction frees serve
this very step. The decision travels to every worker on the `SchedulerOutput` (`messages.StepPlan`); the
workers choose *which* tokens with the active scoring policy and move them before the step's forward. Token
entropies come back from the reporting worker and go out again with the request's next step, so every
tensor-parallel rank scores with the same budgets, decisions and entropies.

Budgets are per request: the server's settings, overridden by what a request gives in its `extra_args` (the
OpenAI API's `vllm_xargs`, see `CompressionConfig.for_request`; the frontend has already refused bad values).
Workers need no per-request settings: every length they use arrives in the plan.

Schedules (method doc, "Schedules"):
- prefill: once the prompt is processed, a request longer than its budget is compressed to it;
- decode (R-KV): whenever the kept length reaches budget + decode_interval, it is compressed back to budget;
- memory pressure (opt-in): when the running requests' next tokens need more blocks than the pool has free,
  requests are compressed to their budget, those holding the most slots above it first, before vLLM would
  preempt anyone.

With prefix caching on, a request's computed blocks are hashed just before its first compaction (so the next
request with the same prefix reuses them), and the block manager gives every cached or shared block the
compaction would rewrite a private copy (`core/block_manager.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from infokv_vllm import logger
from infokv_vllm.config import CompressionConfig, compression_of
from infokv_vllm.core.block_manager import CompactingAttentionManager
from infokv_vllm.messages import Compaction, StepPlan, TokenEntropies, attach_plan, report_of
from infokv_vllm.metrics import CompressionSchedulerStats, CompressionStats
from infokv_vllm.scoring import make_policy
from infokv_vllm.signals import ATTENTION



@dataclass
class CompressionRecord:
    """What compression did to one request, for the log line when it finishes."""

    events: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0
    peak_slots: int = 0  # the most KV slots it held (before a compaction, or when it finished)


class CompressingScheduler(Scheduler):
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
        self._scores_attention = ATTENTION in make_policy(self.compression).signals
        self.records: dict[str, CompressionRecord] = {}
        self.totals = CompressionStats()  # since start-up; the frontend's metrics derive from it
        self._past_prompt: set[str] = set()  # requests whose prompt-compression point has been evaluated
        self._entropies: dict[str, TokenEntropies] = {}  # reported, to be sent with the request's next step
        self._settings: dict[str, CompressionConfig] = {}  # per request: the server's, as the request overrides

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        decided = [c for request in self.running if (c := self._decide(request)) is not None]
        compactions = [applied for compaction in decided
                       if (applied := self._apply(compaction, "decode" if compaction.decoding else "prompt"))]
        if self.compression.memory_pressure:
            compactions += self._relieve_memory_pressure({c.request_id for c in compactions})
        output = super().schedule(*args, **kwargs)
        # A request preempted later in this same schedule() lost all its blocks; nothing is left to move, and
        # its entropies will be measured again when it is recomputed.
        for request_id in output.preempted_req_ids:
            self._entropies.pop(request_id, None)
        if not self.requests:
            # Every request has finished (this step hands the last of them to the workers): the per-request state
            # must be empty (the soak benchmark reads this line).
            logger.debug("infokv: idle scheduler holds per-request state of %s", self.requests_held())
        attach_plan(output, StepPlan(
            compactions=[c for c in compactions if c.request_id not in output.preempted_req_ids],
            window_starts=self._window_starts(output) if self._scores_attention else {},
            entropies={request_id: self._entropies.pop(request_id)
                       for request_id in output.num_scheduled_tokens if request_id in self._entropies}))
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output, *args, **kwargs):
        # Before vLLM's bookkeeping, which frees the requests that finish in this step (and their entropies).
        report = report_of(model_runner_output)
        if report is not None:
            self.totals.seconds_scoring += report.seconds_scoring
            self.totals.seconds_compacting += report.seconds_compacting
            self._entropies.update((request_id, entropies) for request_id, entropies in report.entropies.items()
                                   if request_id in self.requests)
        return super().update_from_output(scheduler_output, model_runner_output, *args, **kwargs)

    def make_stats(self, *args, **kwargs) -> CompressionSchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is None:
            return None
        logical = [request.num_computed_tokens for request in self.running]
        kept = [self.manager.physical_len(request.request_id, length) for request, length in zip(self.running, logical)]
        return CompressionSchedulerStats.extend(
            stats, dataclasses.replace(self.totals, kept_tokens=sum(kept), logical_tokens=sum(logical)))

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
            if request_id not in self._past_prompt:
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
                "entropies": len(self._entropies), "settings": len(self._settings),
                "evicted": len(self.manager.evicted)}

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
        """A compaction of the request's `physical` slots down to its budget, with the prompt's or the decode
        observation window."""
        logical, prompt = request.num_computed_tokens, request.num_prompt_tokens
        return Compaction(request.request_id, logical, physical, settings.budget_for(logical, prompt),
                          settings.protected_len(prompt),
                          settings.decode_window if decoding else settings.prefill_window, decoding)

    def _relieve_memory_pressure(self, already_compacted: set[str]) -> list[Compaction]:
        compactions = []
        pool = self.kv_cache_manager.block_pool
        needed = sum(map(self._blocks_for_next_step, self.running))
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
        # A preempted request is recomputed in full and compressed afresh, so its tokens depend on the batch.
        logger.debug("infokv: request %s preempted after %d compressions", request.request_id,
                     self.records[request.request_id].events if request.request_id in self.records else 0)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args, **kwargs):
        self._past_prompt.discard(request.request_id)
        self._entropies.pop(request.request_id, None)
        record = self.records.pop(request.request_id, None)
        if self.settings_of(request).enabled:
            record = record or CompressionRecord()
            held = self.manager.physical_len(request.request_id, request.num_computed_tokens)
            logger.debug("infokv: request %s finished after %d compressions: %d tokens evicted, %d blocks "
                         "freed, peak %d KV slots", request.request_id, record.events, record.tokens_evicted,
                         record.blocks_freed, max(record.peak_slots, held))
        self._settings.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)
