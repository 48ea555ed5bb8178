"""Compression on vLLM's CUDA platform, end to end, with CUDA graphs on (piecewise) and bf16: what the CPU suite
checks, on a GPU. Skipped without CUDA (conftest); run on a GPU machine with `python -m pytest tests/gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vllm import SamplingParams
from vllm.config.compilation import CUDAGraphMode
from vllm.utils.math_utils import cdiv

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion, scheduler_of
from infokv_testing.local_server import vllm_server
from infokv_vllm.metrics import METRIC_PREFIX
from infokv_vllm.platforms.cuda import RECORDING_BACKENDS
from tests.gpu.conftest import GPU_ENGINE, GPU_SERVE_FLAGS
from tests.test_eviction_e2e import PROMPTS
from tests.test_serve_e2e import settled_metrics
from tests.test_snapkv_reference import CONFIG, batch_prompts, policy_reference, vllm_kept_sets

pytestmark = pytest.mark.e2e

GREEDY = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
BUDGET, INTERVAL, BLOCK_SIZE = 64, 32, GPU_ENGINE["block_size"]


def test_infokv_runs_with_cuda_graphs_triton_kernels_and_scoring_attention(gpu_model_dir):
    """Started as a deployment starts: without a fixed KV size, so vLLM profiles CUDA-graph memory on a minimal
    KV cache before the real pool (signal planes built for that cache crashed an H200 run)."""
    settings = {"method": "infokv", "budget": BUDGET, "decode_interval": INTERVAL}
    engine = {**GPU_ENGINE, "kv_cache_memory_bytes": None, "num_gpu_blocks_override": 4096}
    with in_process_llm(gpu_model_dir, settings, **engine) as llm:
        config = llm.llm_engine.vllm_config
        assert config.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
        runner = model_runner_of(llm)
        assert runner.kernels.name == "triton"
        layers = config.compilation_config.static_forward_context.values()
        assert all(isinstance(layer.impl, RECORDING_BACKENDS.impls) for layer in layers if hasattr(layer, "impl"))
        outputs = run_to_completion(llm, PROMPTS, GREEDY)
        assert all(len(tokens) == 200 for tokens in outputs.values())
        assert scheduler_of(llm).totals.events >= 2 * len(PROMPTS)


def test_budget_above_length_gives_vanilla_outputs(gpu_model_dir):
    with in_process_llm(gpu_model_dir, **GPU_ENGINE) as llm:
        vanilla = run_to_completion(llm, PROMPTS, GREEDY)
    with in_process_llm(gpu_model_dir, {"method": "infokv", "budget": 500}, **GPU_ENGINE) as llm:
        assert run_to_completion(llm, PROMPTS, GREEDY) == vanilla
        assert scheduler_of(llm).totals.events == 0


@pytest.mark.parametrize("method", ["streaming", "infokv"])
def test_pages_held_stay_within_budget(gpu_model_dir, method):
    settings = {"method": method, "budget": BUDGET, "decode_interval": INTERVAL}
    with in_process_llm(gpu_model_dir, settings, **GPU_ENGINE) as llm:
        run_within_budget_pages(llm)


def run_within_budget_pages(llm) -> dict[str, list[int]]:
    """Run PROMPTS; no request holds more pages than BUDGET + INTERVAL need, and every page returns."""
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    initial_free = pool.get_num_free_blocks()
    peak = [0]

    def watch():
        peak[0] = max([peak[0], *map(len, scheduler.manager.req_to_blocks.values())])

    outputs = run_to_completion(llm, PROMPTS, GREEDY, after_step=watch)
    assert peak[0] <= cdiv(BUDGET + INTERVAL, BLOCK_SIZE) + 1
    assert pool.get_num_free_blocks() == initial_free
    return outputs


@pytest.mark.parametrize("method", ["streaming", "infokv"])
def test_async_scheduling_gives_the_synchronous_outputs(gpu_model_dir, method):
    """vLLM's GPU default schedules the next step while the current one runs. Compactions decided on counts that
    include the step in flight move KV that step has written (the worker runs steps in order, on one stream), and
    the signals never wait for an output: greedy outputs equal synchronous scheduling's, and every page returns."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    settings = {"method": method, "budget": BUDGET, "decode_interval": INTERVAL}
    outputs = {}
    for asynchronous in (False, True):
        with in_process_llm(gpu_model_dir, settings, async_scheduling=asynchronous, **GPU_ENGINE) as llm:
            scheduler = scheduler_of(llm)
            assert isinstance(scheduler, AsyncScheduler) is asynchronous
            pool = scheduler.kv_cache_manager.block_pool
            initial_free = pool.get_num_free_blocks()
            outputs[asynchronous] = run_to_completion(llm, PROMPTS, GREEDY)
            assert scheduler.totals.events >= len(PROMPTS)
            assert pool.get_num_free_blocks() == initial_free
            assert not scheduler.requests and scheduler.requests_held() == dict.fromkeys(scheduler.requests_held(), 0)
    assert outputs[True] == outputs[False]


def test_snapkv_keeps_the_transformers_sets_on_a_batch(gpu_model_dir):
    """bf16 on the GPU against float32 transformers on the CPU: near-equal sets, not identical ones."""
    from transformers import AutoModelForCausalLM

    prompts = batch_prompts(gpu_model_dir)
    kept, _ = vllm_kept_sets(gpu_model_dir, prompts, **GPU_ENGINE)
    model = AutoModelForCausalLM.from_pretrained(gpu_model_dir, dtype=torch.float32, attn_implementation="eager")
    for rid, ids in prompts.items():
        reference_kept, _ = policy_reference(model.eval(), ids, "snapkv")
        overlap = [len(set(a.tolist()) & set(b.tolist())) / CONFIG.budget
                   for a, b in zip(kept[rid].cpu().flatten(0, 1), reference_kept.flatten(0, 1))]
        assert sum(overlap) / len(overlap) >= 0.9, (rid, min(overlap))


def test_vllm_serve_answers_with_compression_on(gpu_model_dir, tmp_path: Path):
    """The reply comes from a compressed request: the server's compression metrics (what the CPU suite reads,
    tests/test_serve_e2e.py) count its compactions, and the prompt beyond the budget was evicted."""
    from openai import OpenAI

    flags = ["--kv-compression", "infokv", "--kv-budget", str(BUDGET)]
    with vllm_server(gpu_model_dir, flags, tmp_path / "serve.log", base_flags=GPU_SERVE_FLAGS) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=str(gpu_model_dir), max_tokens=200, temperature=0,
            messages=[{"role": "user", "content": "Tell me a long story about a lighthouse. " * 10}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        metrics = settled_metrics(url)
    assert reply.usage.prompt_tokens > BUDGET
    assert metrics[f"{METRIC_PREFIX}compression_events_total"] >= 1, metrics
    assert metrics[f"{METRIC_PREFIX}tokens_evicted_total"] >= reply.usage.prompt_tokens - BUDGET, metrics
    log = (tmp_path / "serve.log").read_text()
    assert "experimental" in log and "-> PIECEWISE" in log


def test_prefix_caching_serves_hits_and_never_rewrites_shared_pages(gpu_model_dir):
    """The CPU suite's prefix-cache checks (tests/test_prefix_caching_e2e.py) on a GPU, with the GPU page view
    the copies index: a compressed request's pages, shared with an opted-out reader while both run, keep their
    bytes through its compactions; a later request reuses the prefix and is compressed; every page returns."""
    from tests.test_prefix_caching_e2e import QUESTIONS, UNCOMPRESSED

    engine_settings = {**GPU_ENGINE, "max_model_len": 2048}
    with in_process_llm(gpu_model_dir, {"method": "infokv", "budget": 1100, "decode_interval": 16},
                        **engine_settings) as llm:
        engine, scheduler, runner = llm.llm_engine, scheduler_of(llm), model_runner_of(llm)
        idle_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        blocks_of = scheduler.manager.req_to_blocks
        reader_params = UNCOMPRESSED.clone()
        reader_params.max_tokens = 200
        engine.add_request("compressed", QUESTIONS["first"], SamplingParams(temperature=0, max_tokens=200,
                                                                           ignore_eos=True))
        engine.step()
        engine.step()
        engine.add_request("reader", QUESTIONS["second"], reader_params)
        engine.step()
        (compressed,) = (request_id for request_id in blocks_of if request_id.startswith("compressed-"))
        (reader,) = (request_id for request_id in blocks_of if request_id.startswith("reader-"))
        shared = [block.block_id for block in blocks_of[reader] if block in blocks_of[compressed]]
        assert shared
        cache = runner.compactor.caches[0]
        before = cache[shared].clone()
        finished = set()
        while engine.has_unfinished_requests():
            finished.update(output.request_id for output in engine.step() if output.finished)
            if "reader" not in finished:
                assert torch.equal(cache[shared], before)
        events = scheduler.totals.events
        assert events > 0
        (output,) = llm.generate([QUESTIONS["third"]], SamplingParams(temperature=0, max_tokens=40,
                                                                      extra_args={"kv_budget": 128}),
                                 use_tqdm=False)
        assert output.num_cached_tokens >= len(shared) * BLOCK_SIZE
        assert scheduler.totals.events > events
        assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == idle_free


def test_fp8_cache_compresses_and_matches_vanilla_fp8_above_the_budget(gpu_model_dir):
    """fp8 pages (float8_e4m3fn, per-tensor scales; vLLM hands FLASH_ATTN fp8 queries): a budget above the length
    gives vanilla fp8's outputs, a small one compresses within the budget's pages and returns every page."""
    engine = {**GPU_ENGINE, "kv_cache_dtype": "fp8"}
    with in_process_llm(gpu_model_dir, **engine) as llm:
        vanilla = run_to_completion(llm, PROMPTS, GREEDY)
    with in_process_llm(gpu_model_dir, {"method": "infokv", "budget": 500}, **engine) as llm:
        assert run_to_completion(llm, PROMPTS, GREEDY) == vanilla
        assert scheduler_of(llm).totals.events == 0
    settings = {"method": "infokv", "budget": BUDGET, "decode_interval": INTERVAL}
    with in_process_llm(gpu_model_dir, settings, **engine) as llm:
        outputs = run_within_budget_pages(llm)
        assert all(len(tokens) == 200 for tokens in outputs.values())
        assert scheduler_of(llm).totals.events >= 2 * len(PROMPTS)


def test_gpt_oss_shape_compresses_its_full_attention_group(gpu_model_dir, tmp_path: Path):
    """gpt-oss's shape (a sliding-window layer, then a full-attention one with sinks, routed experts; written here
    with the model directory's tokenizer): the full-attention group is compressed and returns every page, the
    sliding-window group stays vLLM's, and a budget above the length gives vanilla outputs."""
    from infokv_testing.tiny_models import write_tiny_model

    model = write_tiny_model("gpt-oss", gpu_model_dir, tmp_path / "gpt-oss")
    with in_process_llm(model, **GPU_ENGINE) as llm:
        vanilla = run_to_completion(llm, PROMPTS, GREEDY)
    with in_process_llm(model, {"method": "infokv", "budget": 500}, **GPU_ENGINE) as llm:
        assert run_to_completion(llm, PROMPTS, GREEDY) == vanilla
    settings = {"method": "infokv", "budget": BUDGET, "decode_interval": INTERVAL}
    with in_process_llm(model, settings, **GPU_ENGINE) as llm:
        scheduler = scheduler_of(llm)
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        assert sorted(type(manager).__name__ for manager in managers) == ["CompactingAttentionManager",
                                                                           "SlidingWindowManager"]
        pool = scheduler.kv_cache_manager.block_pool
        idle_free = pool.get_num_free_blocks()
        outputs = run_to_completion(llm, PROMPTS, GREEDY)
        assert all(len(tokens) == 200 for tokens in outputs.values()) and outputs != vanilla
        assert scheduler.totals.blocks_freed > 0
        assert pool.get_num_free_blocks() == idle_free
