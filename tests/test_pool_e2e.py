"""The pool-wide mode (`--kv-pool-target`) inside real vLLM (CPU, SmolLM2): pages go where the least attention is
lost, across the batch."""

from __future__ import annotations

import random
import urllib.request

import pytest
from vllm import SamplingParams

from infokv_testing.local_engine import BLOCK_SIZE, in_process_llm, model_runner_of, run_to_completion, \
    scheduler_of
from infokv_testing.local_server import EAGER, vllm_server
from infokv_vllm.metrics import METRIC_PREFIX

pytestmark = pytest.mark.e2e

_rng = random.Random(0)
_WORDS = "apple river stone cloud garden lamp window forest candle mirror silver bridge ocean pencil tiger".split()
PROMPTS = {
    # The same token 300 times: the window's attention spreads over the whole history (identical keys).
    "attended": "the " * 300 + "\n\nCount from 1 to 100, separated by commas: 1, 2, 3,",
    # Unrelated words the question tells the model to forget: the window attends little of them.
    "ignored": " ".join(_rng.choice(_WORDS) for _ in range(300))
               + "\n\nForget the words above. Count from 1 to 100, separated by commas: 1, 2, 3,",
}
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
POOL_BLOCKS = 40  # the two ~330-token prompts hold 22 pages of 32 tokens
POOL = {"method": "infokv", "pool_target": 0.45, "decode_interval": 32}


def _short(request_id: str) -> str:
    return request_id.split("-")[0]


def test_pages_go_where_the_window_ignores_the_history(smollm2_dir):
    with in_process_llm(smollm2_dir, POOL, num_gpu_blocks_override=POOL_BLOCKS) as llm:
        scheduler = scheduler_of(llm)
        pool = scheduler.kv_cache_manager.block_pool
        least: dict[str, int] = {}
        held_pages = []

        def watch():
            for request in scheduler.running:
                length = scheduler.manager.physical_len(request.request_id, request.num_computed_tokens)
                least[_short(request.request_id)] = min(least.get(_short(request.request_id), length), length)
            held_pages.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())

        outputs = run_to_completion(llm, PROMPTS, PARAMS, after_step=watch)
        assert sorted(map(len, outputs.values())) == [40, 40]
        assert scheduler.totals.events >= 2 and scheduler.totals.attention_lost > 0
        # Both are compressed, the ignored history by at least three pages more.
        assert least["ignored"] + 3 * BLOCK_SIZE <= least["attended"] < 330, least
        # The batch's pages come back under the target share (less the room to grow) once its compactions ran.
        assert min(held_pages) <= int(POOL["pool_target"] * (POOL_BLOCKS - 1))
        # Every page returns; no per-request state stays behind, on the scheduler or (after one more step, which
        # tells the worker the requests finished) on the worker.
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
        assert not any(scheduler.requests_held().values()), scheduler.requests_held()
        run_to_completion(llm, {"flush": "Hi."}, SamplingParams(max_tokens=1))
        held = model_runner_of(llm).requests_held()
        assert held["evicted"] == held["probed"] == 0, held


def test_with_room_in_the_pool_nothing_is_compressed(smollm2_dir):
    with in_process_llm(smollm2_dir, num_gpu_blocks_override=POOL_BLOCKS) as llm:
        vanilla = {_short(r): tokens for r, tokens in run_to_completion(llm, PROMPTS, PARAMS).items()}
    with in_process_llm(smollm2_dir, {**POOL, "pool_target": 1.0}, num_gpu_blocks_override=POOL_BLOCKS) as llm:
        outputs = {_short(r): tokens for r, tokens in run_to_completion(llm, PROMPTS, PARAMS).items()}
        assert scheduler_of(llm).totals.events == 0
    assert outputs == vanilla


def test_vllm_serve_runs_the_pool_wide_mode_from_one_flag(smollm2_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    # vLLM checks that the pool holds one request of max_model_len: the pool-wide mode bounds no single request.
    flags = ["--kv-compression", "snapkv", "--kv-pool-target", "0.45", "--kv-decode-interval", "32",
             "--max-model-len", "1024", "--num-gpu-blocks-override", str(POOL_BLOCKS),
             "--block-size", str(BLOCK_SIZE), *EAGER]
    with vllm_server(smollm2_dir, flags, tmp_path / "serve.log") as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused")

        def complete(prompt: str) -> int:
            reply = client.completions.create(model=str(smollm2_dir), prompt=prompt, max_tokens=40,
                                              temperature=0)
            return reply.usage.completion_tokens

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(complete, PROMPTS.values())) == [40, 40]
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            samples = [sample for family in text_string_to_metric_families(response.read().decode())
                       for sample in family.samples if sample.name.startswith(METRIC_PREFIX)]
    by_edge = {sample.labels["le"]: sample.value for sample in samples
               if sample.name == f"{METRIC_PREFIX}pool_compactions_by_attention_lost_total"}
    events = next(s.value for s in samples if s.name == f"{METRIC_PREFIX}compression_events_total")
    assert by_edge["1.0"] == events >= 2, by_edge  # every compaction was the pool's, and counted once
    assert list(by_edge.values()) == sorted(by_edge.values())  # cumulative, as Prometheus' le
    assert next(s.value for s in samples if s.name == f"{METRIC_PREFIX}pool_attention_lost_total") > 0
    assert {s.labels["stat"] for s in samples if s.name == f"{METRIC_PREFIX}request_kv_tokens"} == \
        {"min", "median", "max"}
