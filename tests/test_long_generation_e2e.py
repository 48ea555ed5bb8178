"""Generations longer than the KV pool: with compression bounding every request's KV, `max_model_len` may
exceed what the pool holds; what cannot fit is refused per request (HTTP 400 through `vllm serve`)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from infokv_testing.local_engine import BLOCK_SIZE, in_process_llm, run_to_completion, scheduler_of
from infokv_testing.local_server import CPU_SERVE_FLAGS, EAGER, vllm_server

pytestmark = pytest.mark.e2e

# 16 blocks of 32 SmolLM2 tokens in float32 (30 layers x 3 KV heads x 64 x K,V x 4 bytes = 46,080 bytes a token).
POOL_BYTES = 16 * BLOCK_SIZE * 46_080
MAX_MODEL_LEN = 4096  # eight times what the pool holds
SETTINGS = {"method": "streaming", "budget": 64, "decode_interval": 32}
PROMPT = "Write a very long story about a lighthouse keeper and the ships she saw."


def pool_tokens(llm) -> int:
    return (llm.llm_engine.vllm_config.cache_config.num_gpu_blocks - 1) * BLOCK_SIZE


def test_vanilla_vllm_refuses_this_pool(smollm2_dir):
    with pytest.raises(Exception, match="To serve at least one request with the model's max seq len"):
        with in_process_llm(smollm2_dir, kv_cache_memory_bytes=POOL_BYTES, max_model_len=MAX_MODEL_LEN):
            pass


def test_a_generation_four_times_the_pool_completes(smollm2_dir):
    with in_process_llm(smollm2_dir, SETTINGS, kv_cache_memory_bytes=POOL_BYTES,
                        max_model_len=MAX_MODEL_LEN) as llm:
        capacity = pool_tokens(llm)
        assert capacity < MAX_MODEL_LEN // 4
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        initial_free = pool.get_num_free_blocks()
        length = 4 * capacity
        outputs = run_to_completion(llm, {"long": PROMPT}, SamplingParams(temperature=0, max_tokens=length,
                                                                         ignore_eos=True))
        assert len(outputs["long"]) == length
        assert pool.get_num_free_blocks() == initial_free

        engine = llm.llm_engine
        too_long = "lighthouse " * capacity
        with pytest.raises(VLLMValidationError, match=r"prompt \(\d+ tokens\) is too long for this server's KV"):
            engine.add_request("too-long", too_long, SamplingParams(max_tokens=4))
        opt_out = SamplingParams(max_tokens=capacity, extra_args={"kv_compression": "none"})
        with pytest.raises(VLLMValidationError, match="the request opts out of compression; lower max_tokens"):
            engine.add_request("opt-out", PROMPT, opt_out)
        fits = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, extra_args={"kv_compression": "none"})
        assert len(run_to_completion(llm, {"opt-out-fits": PROMPT}, fits)["opt-out-fits"]) == 64


def test_vllm_serve_streams_past_the_pool_and_refuses_what_cannot_fit(smollm2_dir, tmp_path: Path):
    from openai import BadRequestError, OpenAI

    flags = ["--kv-cache-memory-bytes", str(POOL_BYTES), "--max-model-len", str(MAX_MODEL_LEN), "--block-size",
             str(BLOCK_SIZE), "--kv-compression", "streaming", "--kv-budget", "64", "--kv-decode-interval", "32",
             *EAGER]
    base = [flag for flag in CPU_SERVE_FLAGS if flag not in ("--kv-cache-memory-bytes", "1G", "--max-model-len",
                                                              "4096")]
    with vllm_server(smollm2_dir, flags, tmp_path / "serve.log", base_flags=base) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            assert b"vllm:kv_cache_usage_perc" in response.read()
        length = 4 * 15 * BLOCK_SIZE  # four times the 15 usable blocks
        stream = client.completions.create(model=str(smollm2_dir), prompt=PROMPT, max_tokens=length,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert len(pieces) >= length - 8  # one chunk a token, give or take merged pieces
        with pytest.raises(BadRequestError, match="too long for this server's KV cache"):
            client.completions.create(model=str(smollm2_dir), prompt="lighthouse " * 480, max_tokens=4)
        with pytest.raises(BadRequestError, match="opts out of compression"):
            client.completions.create(model=str(smollm2_dir), prompt=PROMPT, max_tokens=1000,
                                      extra_body={"vllm_xargs": {"kv_compression": "none"}})
        # A streaming chat too is refused with HTTP 400, not with an error event inside a 200 stream.
        with pytest.raises(BadRequestError, match="opts out of compression"):
            client.chat.completions.create(model=str(smollm2_dir), messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=1000, stream=True,
                                           extra_body={"vllm_xargs": {"kv_compression": "none"}})
        reply = client.completions.create(model=str(smollm2_dir), prompt=PROMPT, max_tokens=8,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 8
