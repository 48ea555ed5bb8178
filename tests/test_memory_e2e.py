"""Compression's per-block state (signal planes, the pool-wide mode's probe scores) comes out of the KV memory vLLM
is given, so KV and state together stay within `--kv-cache-memory-bytes`."""

from __future__ import annotations

import pytest

from infokv_testing.local_engine import in_process_llm, model_runner_of
from infokv_vllm.core.worker import compression_state_bytes_per_block

pytestmark = pytest.mark.e2e

KV_BYTES = 64 * 2**20


def kv_pool_bytes(llm) -> tuple[int, int]:
    """The KV tensors the runner allocated, and the compression state it holds beside them."""
    runner = model_runner_of(llm)
    kv = sum(tensor.nbytes for tensor in runner.kv_caches)
    signals = runner.signals.nbytes() if getattr(runner, "signals", None) is not None else 0
    return kv, signals


@pytest.mark.parametrize("compression", [{"method": "infokv", "budget": 128},
                                         {"method": "snapkv", "pool_target": 0.5}])
def test_kv_and_compression_state_fit_the_kv_memory_given(smollm2_dir, compression):
    with in_process_llm(smollm2_dir, kv_cache_memory_bytes=KV_BYTES) as vanilla:
        vanilla_kv, _ = kv_pool_bytes(vanilla)
        vanilla_blocks = vanilla.llm_engine.vllm_config.cache_config.num_gpu_blocks
    with in_process_llm(smollm2_dir, compression, kv_cache_memory_bytes=KV_BYTES) as llm:
        kv, signals = kv_pool_bytes(llm)
        runner = model_runner_of(llm)
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        layers = len(runner.kv_caches)
        spec = next(iter(runner.get_kv_cache_spec().values()))
        probe_scores = layers * spec.num_kv_heads * spec.block_size * 4 * blocks if "pool_target" in compression else 0
    assert signals > 0 and vanilla_kv <= KV_BYTES
    assert kv + signals + probe_scores <= KV_BYTES, (kv, signals, probe_scores)
    assert blocks < vanilla_blocks
    state = compression_state_bytes_per_block(runner.policy.signals, layers, spec.num_kv_heads, spec.block_size,
                                              "pool_target" in compression)
    assert signals + probe_scores == state * blocks
