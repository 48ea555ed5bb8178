"""The KV block manager for compressed requests: block counts follow the physical (kept) length.

vLLM's `FullAttentionManager` sizes a request's block list from its logical token count. A compressed request
keeps `logical - evicted` tokens in its leading slots, so every count here subtracts `evicted`, and `compact`
returns the tail blocks to the pool for other requests. The manager is chosen through vLLM's KV-cache-spec
registry: the model runner reports its full-attention layers as `CompressedAttentionSpec` (grouped with full
attention), and the registry maps that spec to this manager.

With vLLM's prefix caching, a compaction must never rewrite a block another request may read: one that is
cached (hashed, so a later request with the same prefix reuses it) or shared. Three rules keep that true:

- a compaction gives each such block in the rewritten range a private copy (`BlockCompaction.copies`) and hands
  the original back to the pool, still cached;
- a compressing request that hits the cache copies its hit blocks at admission (vLLM's copy-on-write path), so
  its observation window's attention never mixes with another request's in a shared block; where the pool has no
  room for the copies, it takes over the hit blocks no other request holds (they lose their hash) instead;
- blocks are hashed only once their KV is computed (vLLM hashes them when they are scheduled), and never after a
  request's first compaction (its slots no longer hold the prefix's tokens in order). A hit is therefore always
  of finished KV and signals, which the admission copy can read before the step's forward.
"""

from __future__ import annotations

from collections.abc import Callable
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
        Prompts longer than the pool admits are refused per request (`admission.admit_request`), and so are
        requests that opt out and would outgrow the pool.
        """
        full = super().max_memory_usage_bytes(vllm_config)
        bound = compression_of(vllm_config).kv_bound
        if bound is None:
            return full
        return min(full, (cdiv(bound, self.block_size) + 1) * self.page_size_bytes)


@dataclass(frozen=True)
class BlockCompaction:
    """What a compaction did to a request's block list."""

    freed: int  # blocks it returned to the pool, net of the private copies it took
    copies: tuple[tuple[int, int], ...]  # (index in the block list, new block id): copy that block there first


class CompactingAttentionManager(FullAttentionManager):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evicted: dict[str, int] = {}
        # Whether a request is compressed (the scheduler knows each request's settings; an opted-out request
        # never compacts, so it may share prefix-cache blocks).
        self.compresses: Callable[[str], bool] = lambda request_id: True
        # Per request being admitted: how many of its prefix-cache hit blocks it copies (the rest it takes over)
        self._hit_copies: dict[str, int] = {}

    def physical_len(self, request_id: str, logical_len: int) -> int:
        return logical_len - self.evicted.get(request_id, 0)

    def _whole_hits(self, request_id: str, new_computed_blocks, num_local_computed_tokens: int) -> list:
        """A new compressed request's prefix-cache hit blocks that it holds whole (none without caching)."""
        if not (self.enable_caching and new_computed_blocks and self.compresses(request_id)):
            return []
        return list(new_computed_blocks[:num_local_computed_tokens // self.block_size])

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, *args, **kwargs) -> int:
        evicted = self.evicted.get(request_id, 0)
        blocks = super().get_num_blocks_to_allocate(
            request_id, num_tokens - evicted, new_computed_blocks, total_computed_tokens - evicted,
            num_local_computed_tokens - evicted, num_tokens_main_model - evicted, *args, **kwargs)
        if request_id in self.num_cached_block:  # running: no new hits
            return blocks
        hits = self._whole_hits(request_id, new_computed_blocks, num_local_computed_tokens)
        # A hit block another request holds must be copied; a free one (vLLM counts it in `blocks`: it leaves
        # the free list) is copied while the pool has room, and otherwise taken over by the request, losing its
        # hash, so that a long hit on a small pool is admitted rather than waiting for room it can never have.
        shared = sum(block.ref_cnt > 0 for block in hits)
        spare = self.block_pool.get_num_free_blocks() - blocks - shared
        self._hit_copies[request_id] = shared + min(len(hits) - shared, max(spare, 0))
        return blocks + self._hit_copies[request_id]

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  *args, **kwargs) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          *args, **kwargs)
        hits = self._whole_hits(request_id, new_computed_blocks, num_local_computed_tokens)
        spare_copies = self._hit_copies.pop(request_id, len(hits)) - sum(block.ref_cnt > 1 for block in hits)
        copied, taken_over = [], []
        for index, block in enumerate(hits):  # the leading blocks stay cached first: later hits need them
            if block.ref_cnt > 1 or spare_copies > 0:
                spare_copies -= block.ref_cnt == 1
                copied.append(index)
            else:
                taken_over.append(block.block_id)
        self.block_pool.evict_blocks(set(taken_over))
        blocks = self.req_to_blocks[request_id]
        for index, fresh in zip(copied, self.block_pool.get_new_blocks(len(copied))):
            # vLLM's copy-on-write: the worker copies the KV before the forward (our signals too, see
            # core/runner.py), and both ends are held until that step has run.
            self._apply_cow(request_id, index, blocks[index], fresh)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        evicted = self.evicted.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - evicted, num_tokens_main_model - evicted)

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        if request.request_id in self.evicted:
            return
        # vLLM hashes the blocks a step will compute when it schedules them; wait until they are computed. Under
        # asynchronous scheduling the computed count includes tokens still being sampled (placeholders), whose
        # ids, and so the hashes of their blocks, are not known yet.
        computed = request.num_computed_tokens - request.num_output_placeholders
        super().cache_blocks(request, min(num_tokens, computed), *args, **kwargs)

    def pop_blocks_for_free(self, request_id):
        # Finish, abort and preemption all come through here; a preempted request is recomputed in full.
        self.evicted.pop(request_id, None)
        self._hit_copies.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def compact(self, request_id: str, physical_len: int, kept_len: int, sinks: int) -> BlockCompaction | None:
        """Shrink the request from `physical_len` to `kept_len` slots and free the tail blocks. Blocks the
        compaction rewrites (past the `sinks`, which stay in place) that are cached or shared get private copies
        first. None, and nothing done, when the pool lacks a block to copy a shared one into."""
        blocks = self.req_to_blocks[request_id]
        needed = cdiv(kept_len, self.block_size)
        pool = self.block_pool
        protected = [index for index in range(sinks // self.block_size, needed)
                     if not pool.is_block_writable(blocks[index])]
        free_before = pool.get_num_free_blocks()
        # Shared blocks must be copied; a cached block only this request holds may instead lose its hash.
        protected.sort(key=lambda index: blocks[index].ref_cnt == 1)
        if sum(blocks[index].ref_cnt > 1 for index in protected) > free_before:
            return None
        # Copies are taken before the tail is freed: a copy must never land in a block the compaction reads.
        copied = protected[:free_before]
        replaced = []
        for index, fresh in zip(copied, pool.get_new_blocks(len(copied))):
            replaced.append(blocks[index])
            blocks[index] = fresh
        pool.evict_blocks({blocks[index].block_id for index in protected[free_before:]})
        tail = blocks[needed:]
        del blocks[needed:]
        if request_id in self.num_cached_block:
            self.num_cached_block[request_id] = min(self.num_cached_block[request_id], needed)
        self.evicted[request_id] = self.evicted.get(request_id, 0) + physical_len - kept_len
        # Reverse order, as vLLM frees: the block freed last is reused first.
        pool.free_blocks(reversed(tail))
        pool.free_blocks(replaced)  # still cached: the next request with this prefix reuses them
        return BlockCompaction(freed=pool.get_num_free_blocks() - free_before,
                               copies=tuple((index, blocks[index].block_id) for index in copied))


def register_kv_cache_spec() -> None:
    # The built-in specs register themselves only while the registry is empty, so fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(CompressedAttentionSpec, CompactingAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)
