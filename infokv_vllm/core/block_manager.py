"""The KV block manager for compressed requests: block counts follow the physical (kept) length.

vLLM's `FullAttentionManager` sizes a request's block list from its logical token count. A compressed request
keeps `logical - evicted` tokens in its leading slots, so every count here subtracts `evicted`, and `compact`
returns the tail blocks to the pool for other requests. The manager is chosen through vLLM's KV-cache-spec
registry: the model runner reports its attention layers as `CompressedAttentionSpec` (grouped with full
attention), and the registry maps that spec to this manager.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from infokv_vllm.config import compression_of


@dataclass(frozen=True, kw_only=True)
class CompressedAttentionSpec(FullAttentionSpec):
    """Full attention whose requests may hold fewer KV slots than tokens."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """What one request may need, for vLLM's start-up check that the pool holds one request.

        Where compression bounds every request's KV (an absolute budget), a request holds at most its prompt,
        then budget + interval: the pool must hold that bound plus one block for a prompt, not `max_model_len`.
        Prompts longer than the pool admits are refused per request (`plugin.admit_request`), and so are
        requests that opt out and would outgrow the pool.
        """
        full = super().max_memory_usage_bytes(vllm_config)
        bound = compression_of(vllm_config).kv_bound
        if bound is None:
            return full
        return min(full, (cdiv(bound, self.block_size) + 1) * self.page_size_bytes)


class CompactingAttentionManager(FullAttentionManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evicted: dict[str, int] = {}

    def physical_len(self, request_id: str, logical_len: int) -> int:
        return logical_len - self.evicted.get(request_id, 0)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, *args, **kwargs) -> int:
        evicted = self.evicted.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - evicted, new_computed_blocks, total_computed_tokens - evicted,
            num_local_computed_tokens - evicted, num_tokens_main_model - evicted, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        evicted = self.evicted.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - evicted, num_tokens_main_model - evicted)

    def pop_blocks_for_free(self, request_id):
        # Finish, abort and preemption all come through here; a preempted request is recomputed in full.
        self.evicted.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def compact(self, request_id: str, physical_len: int, kept_len: int) -> int:
        """Shrink the request from `physical_len` to `kept_len` slots; free the tail blocks. Returns #freed."""
        blocks = self.req_to_blocks[request_id]
        needed = cdiv(kept_len, self.block_size)
        tail = blocks[needed:]
        del blocks[needed:]
        if request_id in self.num_cached_block:
            self.num_cached_block[request_id] = min(self.num_cached_block[request_id], needed)
        self.evicted[request_id] = self.evicted.get(request_id, 0) + physical_len - kept_len
        # Reverse order, as vLLM frees: the block freed last is reused first.
        self.block_pool.free_blocks(reversed(tail))
        return len(tail)


def register_kv_cache_spec() -> None:
    # The built-in specs register themselves only while the registry is empty, so fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(CompressedAttentionSpec, CompactingAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)
