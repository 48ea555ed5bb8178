"""The platform-neutral worker extension, mixed into vLLM's worker of each platform: the KV memory it reports is
net of what compression keeps beside each KV block, so vLLM sizes a pool that fits with it.

vLLM turns the memory a worker reports (`--kv-cache-memory-bytes`, or what profiling leaves of
`--gpu-memory-utilization`) into KV blocks. Compression keeps, per block, float32 signal planes (one per layer,
KV head and slot for each signal the policy reads; about 2.3% of a bfloat16 pool at head size 128 per signal) and,
in the pool-wide mode, the probe scores of its requests' slots (one more such plane at most: a probe scores the
slots a request holds). Both are allocated after the pool, so they are taken out of the reported memory first.
"""

from __future__ import annotations

from infokv_vllm import logger
from infokv_vllm.core.block_manager import CompressedAttentionSpec
from infokv_vllm.signals.storage import SlotSignals


class CompressingWorkerMixin:
    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        runner = self.model_runner
        if not runner.compression.enabled:
            return available
        # Signals are kept for the compressed (full-attention) layers only. A block id spans one page of each of
        # them, and, in a model with sliding-window or state layers, as many pages of the other groups' layers
        # (vLLM sizes its groups alike): counting the compressed layers' pages alone reserves a little more than
        # the signals need, never less.
        specs = [spec for spec in runner.get_kv_cache_spec().values() if isinstance(spec, CompressedAttentionSpec)]
        kv_per_block = sum(spec.page_size_bytes for spec in specs)
        state_per_block = compression_state_bytes_per_block(
            runner.policy.signals, len(specs), specs[0].num_kv_heads, specs[0].block_size,
            runner.compression.pool_wide)
        kv = available * kv_per_block // (kv_per_block + state_per_block)
        logger.info("infokv-vllm: compression keeps %d bytes beside each KV block of %d (signals%s): the KV pool "
                    "gets %.3f GiB of the %.3f GiB available", state_per_block, kv_per_block,
                    " and probe scores" if runner.compression.pool_wide else "", kv / 2**30, available / 2**30)
        return kv


def compression_state_bytes_per_block(signals: frozenset[str], num_layers: int, num_kv_heads: int, block_size: int,
                                      pool_wide: bool) -> int:
    """Signal planes, and in the pool-wide mode the probe scores, that compression keeps per KV block."""
    probe_scores = SlotSignals.plane_bytes_per_block(num_layers, num_kv_heads, block_size) if pool_wide else 0
    return SlotSignals.bytes_per_block(signals, num_layers, num_kv_heads, block_size) + probe_scores
