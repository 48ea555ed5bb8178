"""The scheduler extension driven through vLLM's step protocol in this process, asynchronous and synchronous, with
no engine and no model.

vLLM's engine, when it schedules asynchronously, keeps two steps in its batch queue: it schedules step N+1 before
step N's output reaches `update_from_output`, so decisions are made on token counts that include N's tokens, and
the pool-wide mode's loss curves of N's probes arrive after N+1's decisions. `EngineLoop` reproduces that loop
(vLLM's `EngineCore.step_with_batch_queue`); a deterministic stand-in for the model answers each step (the token at
each position is a function of the request and the position, each probe gets an increasing loss curve), and
`WorkerMirror` keeps the worker's per-request state and asserts what the real worker asserts (core/runner.py).
At every step the pages are counted exactly, and the worker's block lists must equal the scheduler's.
"""

from __future__ import annotations

import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from vllm.utils.math_utils import cdiv

from infokv_vllm.config import ADDITIONAL_CONFIG_KEY
from infokv_vllm.messages import Compaction, LossCurve, Probe, WorkerReport, attach_report, plan_of

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from infokv_vllm.core.scheduler import CompressingScheduler

pytestmark = pytest.mark.usefixtures("vllm_plugins_loaded")

BLOCK_SIZE = 16
VOCAB = 49152
SINKS, PREFILL_WINDOW, DECODE_WINDOW, DECODE_INTERVAL = 4, 16, 8, 32


def stub_token(request_id: str, position: int) -> int:
    """The model's token at `position` of a request: a function of the two only, so a request's output is the
    same however it is scheduled, compressed or preempted."""
    return zlib.crc32(f"{request_id}/{position}".encode()) % VOCAB


def stub_loss_curve(probe: Probe) -> LossCurve:
    """What evicting each number of the probed slots would lose: linear, at a per-slot rate that differs between
    requests and probes, so the pool-wide mode's choice depends on it."""
    candidates = probe.physical_len - probe.sinks - probe.window
    rate = 1e-3 * (1 + zlib.crc32(f"{probe.request_id}/{probe.logical_len}".encode()) % 9)
    return LossCurve(probe.logical_len, probe.physical_len, probe.sinks, probe.window,
                     np.arange(candidates + 1, dtype=np.float32) * rate)


# --- the worker ----------------------------------------------------------------------------------------------

@dataclass
class WorkerRequest:
    """What a worker holds of one request."""

    prompt_len: int
    block_ids: list[int]
    num_tokens: int  # the prompt and the tokens sampled so far
    computed: int  # tokens whose KV has been written (logical)
    evicted: int = 0
    probed_slots: int | None = None  # slots the kept probe scores cover; None: the worker holds none
    probed_in_step: int = -1  # the step of its last probe

    @property
    def physical_len(self) -> int:
        return self.computed - self.evicted


@dataclass
class WorkerMirror:
    """The worker's per-request state, updated from each step's `SchedulerOutput` as the real worker updates its
    own, with the real worker's assertions; its forward is the stand-in model."""

    requests: dict[str, WorkerRequest] = field(default_factory=dict)
    compactions: list[Compaction] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    resumed_at: dict[str, int] = field(default_factory=dict)  # request id -> compactions before its last resumption
    # Requests compacted without their probe's scores in the step right after the probe: under asynchronous
    # scheduling the scheduler decided that compaction before the probe's curve arrived.
    probes_dropped_next_step: list[str] = field(default_factory=list)
    steps: int = 0
    report: WorkerReport = field(default_factory=WorkerReport)  # until it leaves with an output of requests

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        from vllm.v1.outputs import ModelRunnerOutput

        plan = plan_of(output)
        self.preempted |= output.preempted_req_ids
        for request_id in output.finished_req_ids:
            self.requests.pop(request_id, None)
        for compaction in plan.compactions:
            self._compact(compaction)
        for probe in plan.probes:
            self._probe(probe)
        self._take_blocks(output)
        request_ids = list(output.num_scheduled_tokens)
        runner_output = ModelRunnerOutput(
            req_ids=request_ids, req_id_to_index={request_id: i for i, request_id in enumerate(request_ids)},
            sampled_token_ids=[self._forward(request_id, output.num_scheduled_tokens[request_id])
                               for request_id in request_ids])
        if request_ids:  # vLLM's shared empty output of a step without requests carries no report
            attach_report(runner_output, self.report)
            self.report = WorkerReport()
        self.steps += 1
        return runner_output

    def _compact(self, compaction: Compaction) -> None:
        """`CompressingRunnerMixin._compact`: the scores it chooses with, and the shortened block list."""
        request = self.requests[compaction.request_id]
        assert request.evicted == compaction.logical_len - compaction.physical_len, (
            "worker and scheduler disagree on evicted tokens", compaction)
        assert (request.computed, len(request.block_ids)) == (
            compaction.logical_len, cdiv(compaction.physical_len, BLOCK_SIZE)), compaction
        for index, block_id in compaction.copies:
            request.block_ids[index] = block_id
        evicted = compaction.physical_len - compaction.kept_len
        if compaction.probed:
            assert request.probed_slots is not None, (
                "the scheduler compacts with a probe this worker does not hold", compaction)
            # The kept probed slots lead the compacted pages (the runner keeps their scores).
            request.probed_slots -= evicted
        else:
            if request.probed_slots is not None and request.probed_in_step == self.steps - 1:
                self.probes_dropped_next_step.append(compaction.request_id)
            request.probed_slots = None  # scored afresh: the probe's scores are dropped
        del request.block_ids[cdiv(compaction.kept_len, BLOCK_SIZE):]
        request.evicted = compaction.logical_len - compaction.kept_len
        self.compactions.append(compaction)

    def _probe(self, probe: Probe) -> None:
        """`CompressingRunnerMixin._probe`: the scores kept, the curve reported with the step's output."""
        request = self.requests[probe.request_id]
        assert (probe.logical_len, probe.physical_len) == (request.computed, request.physical_len), probe
        request.probed_slots, request.probed_in_step = probe.physical_len, self.steps
        self.report.loss_curves[probe.request_id] = stub_loss_curve(probe)

    def _take_blocks(self, output: SchedulerOutput) -> None:
        """vLLM's own state update: new and resumed requests (recomputed in full: nothing evicted, no scores),
        and the blocks appended to running ones."""
        for new in output.scheduled_new_reqs:
            prompt_len = len(new.prompt_token_ids)
            self.requests[new.req_id] = WorkerRequest(prompt_len, list(new.block_ids[0]), prompt_len,
                                                      new.num_computed_tokens)
        cached = output.scheduled_cached_reqs
        for request_id, blocks, computed, outputs in zip(cached.req_ids, cached.new_block_ids,
                                                          cached.num_computed_tokens, cached.num_output_tokens):
            request = self.requests[request_id]
            if request_id in cached.resumed_req_ids:
                self.resumed_at[request_id] = len(self.compactions)
                request.block_ids, request.computed, request.evicted, request.probed_slots = (
                    list(blocks[0]), computed, 0, None)
            elif blocks is not None:
                request.block_ids.extend(blocks[0])
            # The scheduler counts what the worker computed and sampled (placeholders: sampled, not yet returned).
            assert (request.computed, request.num_tokens) == (computed, request.prompt_len + outputs), request_id

    def _forward(self, request_id: str, num_tokens: int) -> list[int]:
        """The stand-in model: writes the step's KV, and samples where the step reaches the request's end."""
        request = self.requests[request_id]
        request.computed += num_tokens
        assert len(request.block_ids) == cdiv(request.physical_len, BLOCK_SIZE), (
            "the step's slots do not fill the request's pages exactly", request_id)
        if request.computed < request.num_tokens:
            return []  # a prompt chunk (or a recomputed one) samples nothing
        request.num_tokens += 1
        return [stub_token(request_id, request.num_tokens - 1)]


# --- the engine ----------------------------------------------------------------------------------------------

def assert_pages_exact(scheduler: CompressingScheduler) -> None:
    """Each running request holds the pages of its kept slots, no more; every block is held as often as the
    requests' lists name it, or free (cached blocks no request holds count as free, as vLLM's pool counts them);
    nothing else holds one."""
    manager, pool = scheduler.manager, scheduler.kv_cache_manager.block_pool
    held = {request_id: blocks for request_id, blocks in manager.req_to_blocks.items() if blocks}
    assert held.keys() <= {request.request_id for request in scheduler.running}
    for request in scheduler.running:
        physical = manager.physical_len(request.request_id, request.num_computed_tokens)
        assert len(held.get(request.request_id, ())) == cdiv(physical, BLOCK_SIZE), request.request_id
    references = Counter(block.block_id for blocks in held.values() for block in blocks)
    assert all(block.ref_cnt == references[block.block_id] for block in pool.blocks if not block.is_null)
    assert len(references) + pool.get_num_free_blocks() + 1 == pool.num_gpu_blocks  # + vLLM's null block


def assert_worker_agrees(scheduler: CompressingScheduler, worker: WorkerMirror) -> None:
    """The worker, having run every scheduled step, holds the scheduler's block list and evicted count of every
    running request."""
    for request in scheduler.running:
        mirrored = worker.requests[request.request_id]
        blocks = [block.block_id for block in scheduler.manager.req_to_blocks[request.request_id]]
        assert (mirrored.block_ids, mirrored.evicted, mirrored.computed) == (
            blocks, scheduler.manager.evicted.get(request.request_id, 0), request.num_computed_tokens)


@dataclass
class EngineLoop:
    """vLLM's engine loop with its batch queue (`EngineCore.step_with_batch_queue`): two steps in flight when the
    scheduler is asynchronous, so step N+1 is scheduled before step N's output is processed; one otherwise.
    Requests arrive at the loop's step numbers; aborts are processed from theirs on, before the next output (as
    vLLM processes them: after the next step is scheduled, while the previous one is in flight)."""

    scheduler: CompressingScheduler
    worker: WorkerMirror = field(default_factory=WorkerMirror)
    arrivals: dict[int, list[Request]] = field(default_factory=dict)
    aborts: dict[int, list[str]] = field(default_factory=dict)
    pages_held: list[int] = field(default_factory=list)  # per scheduled step: blocks the requests hold
    # Aborted requests, and what was in flight for them: "tokens" (scheduled in a step whose output is still to
    # be processed), "probe" (and the step probed it), "compaction" (and compacted it); "" for none of these.
    aborted: dict[str, str] = field(default_factory=dict)

    def run(self, max_steps: int = 3000) -> None:
        from vllm.v1.request import RequestStatus

        queue_size = 2 if self.scheduler.scheduler_config.async_scheduling else 1
        batch_queue: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
        pool = self.scheduler.kv_cache_manager.block_pool
        for step in range(max_steps):
            for request in self.arrivals.pop(step, ()):
                self.scheduler.add_request(request)
            if self.scheduler.has_requests():
                output = self.scheduler.schedule()
                assert_pages_exact(self.scheduler)
                batch_queue.append((output, self.worker.execute(output)))
                assert_worker_agrees(self.scheduler, self.worker)
                self.pages_held.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
                if len(batch_queue) < queue_size and (
                        output.total_num_scheduled_tokens or self.scheduler.has_requests()):
                    continue
            elif not batch_queue:
                if not self.arrivals:
                    break
                continue
            for due in [due for due in self.aborts if due <= step]:
                for request_id in self.aborts.pop(due):
                    self.aborted[request_id] = _in_flight(request_id, [output for output, _ in batch_queue])
                    self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
            self.scheduler.update_from_output(*batch_queue.popleft())
            assert_pages_exact(self.scheduler)
        else:
            raise AssertionError(f"requests still running after {max_steps} steps")
        self.assert_drained()

    def assert_drained(self) -> None:
        """Every request finished or aborted: no page, and no per-request state, is left anywhere."""
        pool = self.scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
        assert set(self.scheduler.requests_held().values()) == {0}, self.scheduler.requests_held()
        assert not self.worker.requests and not self.aborts


def _in_flight(request_id: str, outputs: list[SchedulerOutput]) -> str:
    """What the steps in flight do for a request (see `EngineLoop.aborted`)."""
    plans = [plan_of(output) for output in outputs]
    if any(compaction.request_id == request_id for plan in plans for compaction in plan.compactions):
        return "compaction"
    if any(probe.request_id == request_id for plan in plans for probe in plan.probes):
        return "probe"
    return "tokens" if any(request_id in output.num_scheduled_tokens for output in outputs) else ""


# --- scenarios -----------------------------------------------------------------------------------------------

@pytest.fixture
def make_scheduler(smollm2_dir, monkeypatch):
    """A compressing scheduler over a pool of `num_blocks` pages, built as the engine core builds it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from infokv_vllm.core.block_manager import CompressedAttentionSpec
    from infokv_vllm.core.scheduler import CompressingAsyncScheduler, CompressingScheduler

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")  # the plugin sets it with the engine config

    def make(settings: dict, num_blocks: int, asynchronous: bool = True, prefix_caching: bool = False,
             max_num_batched_tokens: int = 256):
        settings = {"method": "snapkv", "sinks": SINKS, "prefill_window": PREFILL_WINDOW,
                    "decode_window": DECODE_WINDOW, "decode_interval": DECODE_INTERVAL, **settings}
        config = EngineArgs(model=str(smollm2_dir), dtype="float32", max_model_len=2048, block_size=BLOCK_SIZE,
                            max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens,
                            enable_prefix_caching=prefix_caching,
                            additional_config={ADDITIONAL_CONFIG_KEY: settings}).create_engine_config()
        # vLLM's CPU platform schedules synchronously whatever is asked; the protocol under test is the GPU's.
        config.scheduler_config.async_scheduling = asynchronous
        config.cache_config.num_gpu_blocks = num_blocks
        spec = CompressedAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=8, dtype=torch.float32)
        kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                        kv_cache_groups=[KVCacheGroupSpec(["layers"], spec)])
        scheduler = CompressingScheduler(vllm_config=config, kv_cache_config=kv_cache_config,
                                         structured_output_manager=StructuredOutputManager(config),
                                         block_size=BLOCK_SIZE, log_stats=True)
        assert type(scheduler) is (CompressingAsyncScheduler if asynchronous else CompressingScheduler)
        return scheduler

    return make


def make_requests(scheduler: CompressingScheduler, prompts: dict[str, list[int]], max_tokens: int,
                  **extra_args) -> list[Request]:
    """Requests with these prompts (request id -> token ids), hashed for the prefix cache as the engine hashes
    them; `extra_args` are per-request compression settings."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_function = get_hash_fn_by_name(scheduler.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_function)
    hasher = get_request_block_hasher(BLOCK_SIZE, hash_function)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args or None)
    return [Request(request_id=request_id, prompt_token_ids=prompt, sampling_params=params, pooling_params=None,
                    block_hasher=hasher) for request_id, prompt in prompts.items()]


def make_prompts(names: str, length: int, shared: int = 0) -> dict[str, list[int]]:
    """A prompt of `length` tokens per name; the first `shared` tokens are the same in all of them."""
    return {name: [7 + position % 50 for position in range(shared)]
            + [stub_token(name, position) for position in range(shared, length)] for name in names}


def record_hits(loop: EngineLoop) -> dict[str, int]:
    """Each new request's prefix-cache hit in tokens, as the worker receives it, filled in while the loop runs."""
    hits: dict[str, int] = {}
    execute = loop.worker.execute

    def execute_recording_hits(output: SchedulerOutput) -> ModelRunnerOutput:
        hits.update((new.req_id, new.num_computed_tokens) for new in output.scheduled_new_reqs)
        return execute(output)

    loop.worker.execute = execute_recording_hits
    return hits


def assert_outputs_are_the_model(requests: list[Request]) -> None:
    """Each request produced its tokens (all of them, unless aborted), and exactly the stand-in model's: no token
    lost, repeated or reordered by compaction, preemption or the asynchronous protocol."""
    from vllm.v1.request import RequestStatus

    for request in requests:
        prompt_len = request.num_prompt_tokens
        if request.status != RequestStatus.FINISHED_ABORTED:
            assert (request.status, request.num_output_tokens) == (
                RequestStatus.FINISHED_LENGTH_CAPPED, request.max_tokens), request.request_id
        assert list(request.output_token_ids) == [
            stub_token(request.request_id, position)
            for position in range(prompt_len, prompt_len + len(request.output_token_ids))], request.request_id


def test_per_request_budgets_compact_at_the_same_lengths_in_both_protocols(make_scheduler):
    """Deciding on counts that include the step in flight is what the synchronous schedule decides one step later:
    each request is compacted at the same lengths, to the same lengths."""
    compactions = {}
    for asynchronous in (False, True):
        scheduler = make_scheduler({"budget": 64}, num_blocks=64, asynchronous=asynchronous)
        requests = make_requests(scheduler, make_prompts("abcd", 100), max_tokens=120)
        loop = EngineLoop(scheduler, arrivals={0: requests[:2], 3: requests[2:]})
        loop.run()
        assert_outputs_are_the_model(requests)
        compactions[asynchronous] = sorted((c.request_id, c.logical_len, c.physical_len, c.kept_len, c.decoding)
                                           for c in loop.worker.compactions)
    assert compactions[True] == compactions[False]
    # Each prompt to the budget, then back to it whenever it grows by the interval.
    assert [c[1:] for c in compactions[True] if c[0] == "a"] == [
        (100, 100, 64, False), (132, 96, 64, True), (164, 96, 64, True), (196, 96, 64, True)]


def test_pool_wide_mode_compacts_with_the_probes_the_worker_holds(make_scheduler):
    """The pool-wide mode without memory pressure: every compaction chooses with a probe's scores, which the
    worker still holds (the curves arrive a step late), and the batch's KV is brought back to its target."""
    scheduler = make_scheduler({"pool_target": 0.5, "budget": 40}, num_blocks=64)
    requests = make_requests(scheduler, make_prompts("abcd", 100), max_tokens=150)
    loop = EngineLoop(scheduler, arrivals={0: requests[:2], 5: requests[2:]})
    loop.run()
    assert_outputs_are_the_model(requests)
    assert loop.worker.compactions and all(compaction.probed for compaction in loop.worker.compactions)
    assert {compaction.request_id for compaction in loop.worker.compactions} == set("abcd")
    target = int(0.5 * 63)
    # Over the target only until the last probed curve arrives: at most a step's new pages and a page each.
    assert max(loop.pages_held) <= target + 4 and not loop.worker.preempted


def test_memory_pressure_compacts_instead_of_preempting(make_scheduler):
    """A pool too small for the batch at its budgets plus an interval: vLLM preempts, unless memory pressure
    compresses requests first."""
    preempted = {}
    for memory_pressure in (False, True):
        scheduler = make_scheduler({"budget": 64, "memory_pressure": memory_pressure}, num_blocks=24)
        requests = make_requests(scheduler, make_prompts("abcd", 100), max_tokens=150)
        loop = EngineLoop(scheduler, arrivals={0: requests})
        loop.run()
        assert_outputs_are_the_model(requests)
        preempted[memory_pressure] = loop.worker.preempted
    assert preempted[False] and not preempted[True]


def test_a_curve_that_arrives_after_its_scores_were_dropped_is_ignored(make_scheduler):
    """Pool-wide mode with memory pressure: a request probed in step N is compacted by the memory-pressure
    fallback in step N+1, decided before N's curve arrived; the worker drops the probe's scores. The late curve
    must not be kept: a later probed compaction would choose with scores the worker no longer holds."""
    scheduler = make_scheduler({"pool_target": 0.5, "memory_pressure": True, "budget": 40}, num_blocks=20)
    early = make_requests(scheduler, make_prompts("abc", 48), max_tokens=150)
    late = make_requests(scheduler, make_prompts("xy", 47), max_tokens=60)
    loop = EngineLoop(scheduler, arrivals={0: early, 20: late})
    loop.run()
    assert_outputs_are_the_model(early + late)
    assert loop.worker.probes_dropped_next_step  # the race happened
    assert any(compaction.probed for compaction in loop.worker.compactions)


def test_prefix_cache_hits_are_copied_and_compacted(make_scheduler):
    """Requests sharing a prompt prefix reuse its cached pages: a compressed one copies its hit at admission, an
    opted-out one shares them; the first request's compaction gives its cached pages private copies."""
    scheduler = make_scheduler({"budget": 64}, num_blocks=64, prefix_caching=True)
    shared = make_prompts("abc", 100, shared=64)
    first, second = make_requests(scheduler, {"a": shared["a"], "b": shared["b"]}, max_tokens=80)
    (opted_out,) = make_requests(scheduler, {"c": shared["c"]}, max_tokens=80, kv_compression="none")
    loop = EngineLoop(scheduler, arrivals={0: [first], 4: [second, opted_out]})
    hits = record_hits(loop)
    loop.run()
    assert_outputs_are_the_model([first, second, opted_out])
    assert hits == {"a": 0, "b": 64, "c": 64}
    assert any(compaction.copies for compaction in loop.worker.compactions if compaction.request_id == "a")
    assert {compaction.request_id for compaction in loop.worker.compactions} == {"a", "b"}


def test_aborts_in_flight_leave_nothing_behind(make_scheduler):
    """Requests aborted while their steps run (pool-wide mode with memory pressure, so probes, curves in flight
    and compactions are all pending): the scheduler and the worker forget them, and their pages return."""
    scheduler = make_scheduler({"pool_target": 0.5, "memory_pressure": True, "budget": 40}, num_blocks=24)
    requests = make_requests(scheduler, make_prompts("abcde", 90), max_tokens=120)
    requests += make_requests(scheduler, make_prompts("f", 250), max_tokens=120)  # waits for pages
    loop = EngineLoop(scheduler, arrivals={0: requests[:4], 2: requests[4:]},
                      aborts={1: ["b"], 4: ["a"], 10: ["f"], 15: ["c"]})
    loop.run()
    assert_outputs_are_the_model(requests)
    # Aborted with a probe, a compaction or tokens in flight, and while waiting.
    assert sorted(loop.aborted.values()) == ["", "compaction", "probe", "tokens"], loop.aborted


@pytest.mark.parametrize(("settings", "num_blocks", "prompt_len"), [
    ({"budget": 64}, 24, 100), ({"pool_target": 0.8, "budget": 64}, 20, 60)], ids=["per-request", "pool-wide"])
def test_preempted_requests_are_recomputed_and_compressed_afresh(make_scheduler, settings, num_blocks, prompt_len):
    """A pool too small without memory pressure: vLLM preempts; a preempted request comes back without evicted
    slots or probe scores, is compressed afresh, and produces the same tokens."""
    scheduler = make_scheduler(settings, num_blocks=num_blocks)
    requests = make_requests(scheduler, make_prompts("abcd", prompt_len), max_tokens=150)
    loop = EngineLoop(scheduler, arrivals={0: requests})
    loop.run()
    assert_outputs_are_the_model(requests)
    assert loop.worker.preempted and loop.worker.resumed_at.keys() == loop.worker.preempted
    compacted_after_resuming = [
        next(compaction for compaction in loop.worker.compactions[before:] if compaction.request_id == request_id)
        for request_id, before in loop.worker.resumed_at.items()
        if any(compaction.request_id == request_id for compaction in loop.worker.compactions[before:])]
    assert compacted_after_resuming
    for compaction in compacted_after_resuming:
        assert compaction.logical_len == compaction.physical_len, compaction  # nothing evicted since it resumed


def test_opted_out_requests_holding_the_target_leave_compressed_ones_their_room(make_scheduler):
    """Pool-wide mode where requests that opted out hold more than the whole target: the compressed requests'
    fair share is 0, yet each keeps its floor plus an interval's room, and is compacted about once per decode
    interval, not at every page (or token) it grows."""
    scheduler = make_scheduler({"pool_target": 0.5, "budget": 40}, num_blocks=64)
    opted_out = make_requests(scheduler, make_prompts("xy", 300), max_tokens=100, kv_compression="none")
    compressed = make_requests(scheduler, make_prompts("ab", 100), max_tokens=150)
    loop = EngineLoop(scheduler, arrivals={0: opted_out + compressed})
    loop.run()
    assert_outputs_are_the_model(opted_out + compressed)
    compacted = Counter(compaction.request_id for compaction in loop.worker.compactions)
    assert compacted.keys() == {"a", "b"}
    assert max(compacted.values()) <= cdiv(150, DECODE_INTERVAL) + 1, compacted


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_hit_longer_than_the_room_for_its_copies_is_taken_over_not_left_waiting(make_scheduler, asynchronous):
    """A compressed request whose prefix-cache hit is more than half the pool cannot copy it all: it takes over
    the hit blocks no other request holds (they leave the cache), rather than waiting forever for room."""
    scheduler = make_scheduler({"budget": 64}, num_blocks=24, asynchronous=asynchronous, prefix_caching=True)
    prompt = make_prompts("a", 200)["a"]
    (first,) = make_requests(scheduler, {"a": prompt}, max_tokens=10)
    (second,) = make_requests(scheduler, {"b": prompt}, max_tokens=10)
    loop = EngineLoop(scheduler, arrivals={0: [first], 40: [second]})
    hits = record_hits(loop)
    loop.run(max_steps=400)
    assert_outputs_are_the_model([first, second])
    assert hits["b"] >= 160  # it reused the cached prompt


def hold(scheduler: CompressingScheduler, request: Request, num_tokens: int) -> None:
    """Give a request pages for its first `num_tokens` tokens, as computed, through vLLM's KV cache manager (with
    its prefix-cache hit, and hashed as the engine hashes computed blocks)."""
    manager = scheduler.kv_cache_manager
    scheduler.requests[request.request_id] = request
    hit_blocks, hit_tokens = manager.get_computed_blocks(request)[:2]
    assert manager.allocate_slots(request, num_tokens - hit_tokens, hit_tokens, hit_blocks) is not None
    request.num_computed_tokens = num_tokens
    manager.coordinator.cache_blocks(request, num_tokens)


def fill_the_pool(scheduler: CompressingScheduler) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    (filler,) = make_requests(scheduler, make_prompts("z", pool.get_num_free_blocks() * BLOCK_SIZE), 1,
                              kv_compression="none")
    hold(scheduler, filler, filler.num_prompt_tokens)
    assert pool.get_num_free_blocks() == 0


def test_a_compaction_without_room_to_copy_a_shared_page_is_refused_and_changes_nothing(make_scheduler):
    """A page the compaction would rewrite that another request reads needs a private copy: with no free page for
    it, the compaction is refused (None) and the request keeps its pages as they were."""
    scheduler = make_scheduler({"budget": 64}, num_blocks=24, prefix_caching=True)
    prompts = make_prompts("ac", 96)
    compressed, opted_out = (*make_requests(scheduler, {"a": prompts["a"]}, 1),
                             *make_requests(scheduler, {"c": prompts["a"]}, 1, kv_compression="none"))
    hold(scheduler, compressed, 96)
    hold(scheduler, opted_out, 96)  # shares the compressed request's cached pages
    manager = scheduler.manager
    assert [block.ref_cnt for block in manager.req_to_blocks["a"][:4]] == [2] * 4
    fill_the_pool(scheduler)
    before = list(manager.req_to_blocks["a"])
    assert manager.compact("a", 96, 64, SINKS) is None
    assert manager.req_to_blocks["a"] == before and "a" not in manager.evicted


def test_a_compaction_without_room_to_copy_its_own_cached_pages_uncaches_them(make_scheduler):
    """Cached pages only the compacted request holds are rewritten in place where no free page can take a copy:
    they lose their hash (a later request must not hit the rewritten KV), and the tail goes back to the pool."""
    scheduler = make_scheduler({"budget": 64}, num_blocks=24, prefix_caching=True)
    (compressed,) = make_requests(scheduler, make_prompts("a", 96), 1)
    hold(scheduler, compressed, 96)
    fill_the_pool(scheduler)
    manager = scheduler.manager
    rewritten = manager.req_to_blocks["a"][:4]
    assert all(block.block_hash is not None for block in rewritten)
    result = manager.compact("a", 96, 64, SINKS)
    assert result is not None and result.copies == () and result.freed == 2
    assert manager.req_to_blocks["a"] == rewritten and manager.evicted["a"] == 32
    assert all(block.block_hash is None for block in rewritten)
