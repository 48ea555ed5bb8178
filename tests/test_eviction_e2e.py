"""The eviction core inside real vLLM (CPU) with the SmolLM2 model: budgets, freed pages, pressure, isolation."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.utils.math_utils import cdiv

from infokv_testing.local_engine import (
    BLOCK_SIZE,
    count_preemptions,
    in_process_llm,
    model_runner_of,
    run_to_completion,
    scheduler_of,
)

pytestmark = pytest.mark.e2e

PROMPTS = {
    "story": "Once upon a time, in a small village by the sea,",
    "recipe": "Here is my grandmother's recipe for apple pie:",
    "physics": "The three laws of motion formulated by Newton are",
    "travel": "The best way to spend a week in Japan is",
}
GREEDY = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
BUDGET, INTERVAL = 64, 32
STREAMING = {"method": "streaming", "budget": BUDGET, "decode_interval": INTERVAL}
SMALL_POOL = 24  # blocks of 32 tokens: four 250-token requests need 32 without compression


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


@pytest.fixture(scope="module")
def vanilla_small_pool(smollm2_dir):
    with in_process_llm(smollm2_dir, num_gpu_blocks_override=SMALL_POOL) as llm:
        preemptions = count_preemptions(llm)
        outputs = run_to_completion(llm, PROMPTS, GREEDY)
        yield outputs, preemptions[0]


def test_budget_above_length_gives_vanilla_outputs(smollm2_dir, vanilla_small_pool):
    vanilla, _ = vanilla_small_pool
    with in_process_llm(smollm2_dir, {"method": "streaming", "budget": 500},
                        num_gpu_blocks_override=SMALL_POOL) as llm:
        assert run_to_completion(llm, PROMPTS, GREEDY) == vanilla
        assert scheduler_of(llm).totals.events == 0


def test_vanilla_must_preempt_on_the_small_pool(vanilla_small_pool):
    assert vanilla_small_pool[1] > 0


@pytest.fixture(scope="module")
def streaming_engine(smollm2_dir):
    with in_process_llm(smollm2_dir, STREAMING, num_gpu_blocks_override=SMALL_POOL) as llm:
        yield llm


def test_pages_held_stay_within_budget_and_are_reused(streaming_engine):
    llm = streaming_engine
    scheduler = scheduler_of(llm)
    initial_free = free_blocks(llm)
    peak_held = []
    lowest_free = [initial_free]

    def watch():
        held = [len(blocks) for blocks in scheduler.manager.req_to_blocks.values()]
        peak_held.append(max(held, default=0))
        lowest_free[0] = min(lowest_free[0], free_blocks(llm))

    preemptions = count_preemptions(llm)
    before = scheduler.totals.blocks_freed
    outputs = run_to_completion(llm, PROMPTS, GREEDY, after_step=watch)
    assert all(len(tokens) == 200 for tokens in outputs.values())
    assert max(peak_held) <= cdiv(BUDGET + INTERVAL, BLOCK_SIZE) + 1
    # Four requests of ~210 tokens would hold 28 blocks; they ran side by side in a pool of 24 without
    # preemption, so freed pages were handed to other requests.
    assert preemptions[0] == 0
    assert scheduler.totals.blocks_freed - before >= len(PROMPTS) * 3
    assert lowest_free[0] < initial_free
    assert free_blocks(llm) == initial_free


def test_outputs_do_not_depend_on_other_requests(streaming_engine):
    together = run_to_completion(streaming_engine, PROMPTS, GREEDY)
    for request_id, prompt in PROMPTS.items():
        alone = run_to_completion(streaming_engine, {request_id: prompt}, GREEDY)
        assert alone[request_id] == together[request_id], request_id


def test_abort_mid_generation_returns_every_page(streaming_engine):
    llm = streaming_engine
    initial_free = free_blocks(llm)
    engine = llm.llm_engine
    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, GREEDY)
    events_before = scheduler_of(llm).totals.events
    while scheduler_of(llm).totals.events < events_before + 2 * len(PROMPTS):
        engine.step()
    engine.abort_request(list(PROMPTS)[:2])
    while engine.has_unfinished_requests():
        engine.step()
    assert free_blocks(llm) == initial_free
    assert not scheduler_of(llm).manager.evicted


def test_memory_pressure_mode_compresses_instead_of_preempting(smollm2_dir, vanilla_small_pool):
    # The decode schedule alone would never fire (interval beyond the context): only pressure compresses.
    pressure = {"method": "streaming", "budget": BUDGET, "decode_interval": 1000, "memory_pressure": True}
    with in_process_llm(smollm2_dir, pressure, num_gpu_blocks_override=SMALL_POOL) as llm:
        initial_free = free_blocks(llm)
        preemptions = count_preemptions(llm)
        outputs = run_to_completion(llm, PROMPTS, GREEDY)
        assert vanilla_small_pool[1] > 0 and preemptions[0] == 0
        assert scheduler_of(llm).totals.events > 0
        assert all(len(tokens) == 200 for tokens in outputs.values())
        assert free_blocks(llm) == initial_free


def record_signals(llm) -> list[tuple[str, int, dict]]:
    """Instrument the worker's policy: every compaction's (request id, kept length, signals and the keys and
    values it read from the KV pages)."""
    policy = model_runner_of(llm).policy
    original, log = policy.scores, []

    def recording(request):
        read = {"keys": request.keys, "values": request.values}
        log.append((request.request_id, request.physical_len,
                    {k: v.clone() for k, v in {**request.signals, **read}.items() if v is not None}))
        return original(request)

    object.__setattr__(policy, "scores", recording)  # instrument the worker's policy (a frozen dataclass)
    return log


@pytest.mark.parametrize("method", ["infokv", "snapkv"])
def test_scored_policies_keep_signals_per_request(smollm2_dir, method):
    """A request's signals (window attention, entropy carried between steps, layer evolution) and the keys and
    values its decode-time terms read (InfoKV's redundancy and value norm) are the same whether it runs in a batch
    or alone: nothing leaks between requests. Outputs are not compared: scores of different batch shapes differ in
    the last float bits, which may flip a tie at the budget's edge."""
    settings = {"method": method, "budget": BUDGET, "decode_interval": INTERVAL, "prefill_window": 16}
    two = dict(list(PROMPTS.items())[:2])
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    with in_process_llm(smollm2_dir, settings, num_gpu_blocks_override=SMALL_POOL) as llm:
        initial_free = free_blocks(llm)
        log = record_signals(llm)
        run_to_completion(llm, two, params)
        together = list(log)
        for request_id, prompt in two.items():
            log.clear()
            run_to_completion(llm, {request_id: prompt}, params)
            batched = [entry for entry in together if entry[0].startswith(request_id)]
            assert len(batched) >= 2 and len(batched) == len(log)
            if method == "infokv":  # decode-time compactions read both planes
                assert {"keys", "values"} <= set(log[-1][2])
            for (_, kept_batched, signals_batched), (_, kept_alone, signals_alone) in zip(batched, log):
                assert kept_batched == kept_alone
                for name, alone in signals_alone.items():
                    torch.testing.assert_close(signals_batched[name], alone, rtol=1e-4,
                                               atol=1e-4 * float(alone.abs().max()))
        assert free_blocks(llm) == initial_free


def test_a_profiling_cache_before_the_real_one_leaves_nothing_behind(smollm2_dir):
    """vLLM's GPU runner profiles CUDA-graph memory on a minimal KV cache of a few blocks, discards it, then
    initialises the real pool. Replayed here on the CPU runner (which inherits those methods): compression's
    state is built for the real pool only, so compactions on it index its blocks. Signal planes kept from the
    minimal cache crashed the first throughput run on an H200 (a block id beyond the planes' 256 blocks)."""
    settings = {"method": "infokv", "budget": BUDGET, "decode_interval": INTERVAL}
    two = dict(list(PROMPTS.items())[:2])
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    with in_process_llm(smollm2_dir, settings, num_gpu_blocks_override=SMALL_POOL) as llm:
        runner = model_runner_of(llm)
        real_config, signal_count = runner.kv_cache_config, len(runner.recorders)
        expected = run_to_completion(llm, two, params)
        runner._cleanup_profiling_kv_cache()
        runner.compilation_config.max_cudagraph_capture_size = 2  # a CUDA-graph size, as the GPU runner has
        runner._init_minimal_kv_cache_for_profiling()
        assert runner.kv_cache_config.num_blocks < SMALL_POOL and not runner.recorders
        runner._cleanup_profiling_kv_cache()
        runner.initialize_kv_cache(real_config)
        assert runner.signals.planes["attention"].shape[1] == real_config.num_blocks
        assert len(runner.recorders) == signal_count == 3
        initial_free = free_blocks(llm)
        assert run_to_completion(llm, two, params) == expected
        assert scheduler_of(llm).totals.events > 0
        assert free_blocks(llm) == initial_free


def test_requests_carry_their_own_budget_or_opt_out(smollm2_dir):
    """`SamplingParams.extra_args` (the OpenAI API's `vllm_xargs`) override the server's budget per request;
    a bad value is refused when the request is added, and the engine goes on serving the others."""
    from vllm.exceptions import VLLMValidationError

    own = {"server": {}, "opt_out": {"kv_compression": "none"}, "big": {"kv_budget": 128},
           "ratio": {"kv_budget_ratio": 0.5}}
    with in_process_llm(smollm2_dir, STREAMING, num_gpu_blocks_override=SMALL_POOL) as llm:
        scheduler, engine = scheduler_of(llm), llm.llm_engine
        kept, apply = {}, scheduler._apply

        def recording(compaction, *args):
            kept.setdefault(compaction.request_id.split("-")[0], set()).add(compaction.kept_len)
            return apply(compaction, *args)

        scheduler._apply = recording
        with pytest.raises(VLLMValidationError, match="invalid vllm_xargs.kv_budget: 3 leaves no room"):
            engine.add_request("bad", PROMPTS["story"], SamplingParams(max_tokens=8, extra_args={"kv_budget": 3}))
        for request_id, extra_args in own.items():
            params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, extra_args=extra_args)
            engine.add_request(request_id, PROMPTS["story"], params)
        finished = {}
        while engine.has_unfinished_requests():
            finished.update((out.request_id, len(out.outputs[0].token_ids)) for out in engine.step() if out.finished)
    assert sorted(finished.values()) == [200] * len(own)
    assert kept["server"] == {BUDGET} and kept["big"] == {128}
    assert "opt_out" not in kept
    assert len(kept["ratio"]) >= 2 and max(kept["ratio"]) > BUDGET, "half of a growing length"


def test_keep_prompt_never_evicts_the_prompt(smollm2_dir):
    """With `kv_keep_prompt`, a prompt longer than the budget is not compressed after prefill, and every decode
    compaction keeps all of its tokens, in their slots, plus the budget of generated ones; without it, the same
    request is compressed to the budget at once."""
    prompt = " ".join(PROMPTS.values()) * 3  # ~120 tokens: longer than the budget
    with in_process_llm(smollm2_dir, STREAMING, num_gpu_blocks_override=SMALL_POOL) as llm:
        runner, scheduler = model_runner_of(llm), scheduler_of(llm)
        initial_free = free_blocks(llm)
        kept, compact = [], runner.compactor.compact

        def recording(block_ids, keep):
            kept.append(keep.clone())
            return compact(block_ids, keep)

        runner.compactor.compact = recording
        prompt_len = len(llm.get_tokenizer()(prompt)["input_ids"])
        assert prompt_len > BUDGET + INTERVAL
        keep_prompt = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True,
                                     extra_args={"kv_keep_prompt": True})
        outputs = run_to_completion(llm, {"kept": prompt}, keep_prompt)
        assert len(outputs["kept"]) == 150
        assert len(kept) >= 2, "compressed during decoding"
        for keep in kept:
            assert keep.shape[-1] == prompt_len + BUDGET
            assert torch.equal(keep[..., :prompt_len], torch.arange(prompt_len).expand(*keep.shape[:2], -1))
        kept.clear()
        run_to_completion(llm, {"plain": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert [keep.shape[-1] for keep in kept] == [BUDGET]  # the prompt itself is compressed
        assert free_blocks(llm) == initial_free
        assert not scheduler.requests
