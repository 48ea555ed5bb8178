"""fp8 KV caches (`--kv-cache-dtype fp8`: float8_e4m3fn bytes with per-tensor scales) with compression inside real
vLLM (CPU) with the SmolLM2 model: outputs, freed pages, every policy, and compaction moving the bytes exactly.

Two engines for the module: vanilla fp8 vLLM, and one compressing with InfoKV, whose recorders take every signal;
the other policies run on it in turn, set on the worker (the scheduler's decisions do not depend on the policy
beyond the signals recorded, a superset here), so that six policies cost one engine start."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion, scheduler_of
from infokv_vllm.scoring import POLICIES
from tests.test_faults_e2e import assert_no_request_state

pytestmark = pytest.mark.e2e

PROMPTS = {
    "story": "Once upon a time, in a small village by the sea,",
    "physics": "The three laws of motion formulated by Newton are",
}
GREEDY = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
BUDGET, INTERVAL = 40, 32  # a compaction at 72 tokens (3 pages) keeps 40 (2 pages)
FP8 = dict(kv_cache_dtype="fp8", num_gpu_blocks_override=24)


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


@pytest.fixture(scope="module")
def vanilla_fp8_outputs(smollm2_dir):
    with in_process_llm(smollm2_dir, **FP8) as llm:
        return run_to_completion(llm, PROMPTS, GREEDY)


@pytest.fixture(scope="module")
def compressing_fp8(smollm2_dir):
    with in_process_llm(smollm2_dir, {"method": "infokv", "budget": BUDGET, "decode_interval": INTERVAL},
                        **FP8) as llm:
        yield llm


def test_budget_above_length_gives_vanilla_fp8_outputs(vanilla_fp8_outputs, compressing_fp8):
    """(The vanilla engine runs and stops first: two in-process engines cannot live at once.)"""
    runner = model_runner_of(compressing_fp8)
    assert runner.compactor.caches[0].dtype == torch.uint8  # fp8 bytes
    assert runner.compactor.quantizations[0].float8 == torch.float8_e4m3fn
    events = scheduler_of(compressing_fp8).totals.events
    above = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, extra_args={"kv_budget": 500})
    assert run_to_completion(compressing_fp8, PROMPTS, above) == vanilla_fp8_outputs
    assert scheduler_of(compressing_fp8).totals.events == events


def check_compactions_move_bytes_exactly(runner) -> list[int]:
    """Instrument the worker's compactor: after each compaction, every layer's kept keys and values are the
    bytes their slots held before. Returns the kept lengths checked."""
    compactor, checked = runner.compactor, []
    compact = compactor.compact

    def checking(block_ids, keep):
        blocks = torch.tensor(block_ids)

        def slots(cache, values):  # [kv_heads, slots, head_size] bytes
            return compactor.layout.block_plane(cache, blocks, values).transpose(0, 1).flatten(1, 2)

        before = [[slots(cache, values) for values in (False, True)] for cache in compactor.caches]
        compact(block_ids, keep)
        kept = keep.shape[-1]
        for cache, planes, layer_keep in zip(compactor.caches, before, keep.long()):
            for values, was in zip((False, True), planes):
                expected = was.gather(1, layer_keep[..., None].expand(-1, -1, was.shape[-1]))
                assert torch.equal(slots(cache, values)[:, :kept], expected)
        checked.append(kept)

    compactor.compact = checking
    return checked


@pytest.mark.parametrize("method", list(POLICIES))
def test_every_policy_compresses_fp8_pages_and_returns_them(compressing_fp8, method):
    llm = compressing_fp8
    runner, scheduler = model_runner_of(llm), scheduler_of(llm)
    runner.policy = POLICIES[method]()
    checked = check_compactions_move_bytes_exactly(runner)
    initial_free = free_blocks(llm)
    events, freed = scheduler.totals.events, scheduler.totals.blocks_freed
    lowest_free = [initial_free]
    outputs = run_to_completion(llm, PROMPTS, GREEDY,
                                after_step=lambda: lowest_free.__setitem__(0, min(lowest_free[0], free_blocks(llm))))
    assert all(len(tokens) == 100 for tokens in outputs.values())
    assert scheduler.totals.events - events >= 2 * len(PROMPTS)
    assert scheduler.totals.blocks_freed > freed
    assert checked and set(checked) == {BUDGET}
    assert lowest_free[0] < initial_free
    assert free_blocks(llm) == initial_free
    assert_no_request_state(llm)
