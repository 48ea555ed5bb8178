"""Tensor parallelism on CPU: two workers, each holding one of the tiny Llama's two KV heads and selecting for it
with the budgets and decisions the scheduler sends (and the entropies of the logits gathered on every rank); as
worker processes (vLLM's multiprocessing executor) and as Ray actors (vLLM's Ray executor, adapted to CPUs by the
plugin), on a local Ray cluster the test starts itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vllm import SamplingParams

from infokv_testing.local_engine import in_process_llm, run_to_completion, scheduler_of

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parent.parent

PROMPTS = {"fox": "The quick brown fox jumps over the lazy dog. " * 8,
           "count": "One two three four five six seven. " * 9,
           "short": "Tell me about the sea."}
SETTINGS = {"method": "infokv", "budget": 48, "decode_interval": 16, "prefill_window": 16, "decode_window": 8}
PARAMS = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _worker_state(worker) -> tuple[list[str], list[str], int]:
    """(requests, requests with evicted tokens, requests with probed scores) a rank still tracks."""
    runner = worker.model_runner
    return sorted(runner.requests), sorted(runner.evicted), runner.requests_held()["probed"]


def generate(model_dir, settings: dict, tensor_parallel_size: int, executor: str = "mp",
             aborts: dict[int, str] | None = None, **overrides) -> tuple[dict[str, list[int]], int]:
    """Greedy outputs and compression events, the requests in `aborts` (step -> request id) aborted after that
    step; with compression, checks that every page and every request is released, on the scheduler and on every
    rank."""
    with in_process_llm(model_dir, settings, max_model_len=256, tensor_parallel_size=tensor_parallel_size,
                        distributed_executor_backend=executor, **overrides) as llm:
        if executor == "ray":
            from infokv_vllm.platforms.cpu_ray import CPURayExecutor

            assert llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend is CPURayExecutor
        steps = [0]

        def abort_due() -> None:
            steps[0] += 1
            if steps[0] in (aborts or {}):
                llm.llm_engine.abort_request([aborts[steps[0]]])

        outputs = run_to_completion(llm, PROMPTS, PARAMS, after_step=abort_due)
        if settings["method"] == "none":  # vLLM's own scheduler and workers
            return outputs, 0
        scheduler = scheduler_of(llm)
        pool = scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, "every page but vLLM's null block is free"
        assert scheduler.manager.evicted == {}
        events = scheduler.totals.events
        # Workers hear that requests finished with the next step: run one more, short and uncompressed.
        run_to_completion(llm, {"flush": "Hi."}, SamplingParams(max_tokens=2))
        for tracked, evicted, probed in llm.collective_rpc(_worker_state):
            assert [request_id.split("-")[0] for request_id in tracked] == ["flush"] and evicted == []
            assert probed == 0
        return outputs, events


def test_two_ranks_compress_like_one(tiny_llama_dir, monkeypatch):
    one_rank, events = generate(tiny_llama_dir, SETTINGS, 1)
    assert events >= 2 * (len(PROMPTS) - 1), "the two long prompts are compressed after prefill and in decoding"
    uncompressed, _ = generate(tiny_llama_dir, {"method": "none"}, 1)
    assert uncompressed != one_rank, "compression changes the outputs, so the comparison below can fail"

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # CPU tensor parallelism: one bound core per rank
    two_ranks, two_rank_events = generate(tiny_llama_dir, SETTINGS, 2)
    assert two_rank_events == events
    assert two_ranks == one_rank


def test_two_ranks_compress_a_sliding_window_model_with_sinks_like_one(tiny_gpt_oss_dir, monkeypatch):
    """gpt-oss's shape: each rank holds one KV head of the full-attention and of the sliding-window layer, and the
    sinks of its own query heads, which its attention signal reads; the full-attention group is compressed alike
    on both. SnapKV scores with that signal alone: with InfoKV's fused score one request of this random MoE model
    keeps other tokens at one compaction under two ranks (its output differs from the 20th token on), which the
    dense model's test does not show."""
    settings = {**SETTINGS, "method": "snapkv"}
    one_rank, events = generate(tiny_gpt_oss_dir, settings, 1)
    assert events >= 2 * (len(PROMPTS) - 1), "the two long prompts are compressed after prefill and in decoding"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert generate(tiny_gpt_oss_dir, settings, 2) == (one_rank, events)


def test_two_ranks_apply_the_pool_wide_decisions_of_the_reporting_rank(tiny_llama_dir, monkeypatch):
    """Rank 0's loss curves (its own KV head) decide; the other rank compacts with its own probed scores to the
    same lengths (a rank that disagreed would fail the runner's evicted-slots check or lack the probe)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    settings = {**SETTINGS, "budget": None, "pool_target": 0.25}
    outputs, events = generate(tiny_llama_dir, settings, 2, num_gpu_blocks_override=24)
    assert events >= 2 and all(len(tokens) == 48 for tokens in outputs.values())


def test_two_ranks_relieve_memory_pressure_and_abort_like_one(tiny_llama_dir, monkeypatch):
    """A pool too small for the batch: memory pressure compresses instead of preempting, a request is aborted while
    it runs, and both ranks apply the same decisions and release everything."""
    # Prompts below the budget and an interval longer than the generations: every compaction is memory pressure's.
    settings = {**SETTINGS, "budget": 96, "decode_interval": 128, "memory_pressure": True}
    scenario = {"aborts": {40: "count"}, "num_gpu_blocks_override": 10}  # 9 pages: the batch outgrows them
    one_rank, events = generate(tiny_llama_dir, settings, 1, **scenario)
    assert events >= 1 and "count" not in one_rank and len(one_rank["fox"]) == 48
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert generate(tiny_llama_dir, settings, 2, **scenario) == (one_rank, events)


@pytest.fixture
def local_ray_cluster(monkeypatch):
    """A Ray cluster on this machine only, started by the test (no network); its actors import this checkout."""
    import ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("local_ray_cluster")
def test_ray_executor_compresses_like_multiprocessing(tiny_llama_dir, monkeypatch):
    one_rank, events = generate(tiny_llama_dir, SETTINGS, 1)
    assert generate(tiny_llama_dir, SETTINGS, 1, "ray") == (one_rank, events)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert generate(tiny_llama_dir, SETTINGS, 2, "ray") == (one_rank, events)
