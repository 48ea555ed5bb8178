"""Applying a compaction to one worker's KV cache: every layer, every local KV head.

Which tokens stay is the scoring policy's choice (per layer and KV head, equal counts); where their bytes live
inside a page is the attention backend's business. vLLM's CPU attention stores a page's keys column-major and
its values row-major (the layout depends on the instruction set), so instead of hard-coding it we write a
marked page through the backend's own cache-write op once and read back where each slot's elements landed.
"""

from __future__ import annotations

import torch

from infokv_vllm.kernels.compaction import compact_pages_torch

# Probe values stay below 256 so they are exact in every cache dtype (float32, bfloat16, float16).
_PROBE_RADIX = 128


def probe_cpu_page_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> torch.Tensor:
    """[block_size, 2 * head_size]: the element of a CPU attention page (K half, then V half) holding each
    slot's key (first head_size columns) and value (last head_size columns)."""
    import vllm._custom_ops as ops

    if block_size >= _PROBE_RADIX * 2:
        raise ValueError(f"page layout probe supports block sizes below {_PROBE_RADIX * 2}, got {block_size}")
    slots = torch.arange(block_size)

    def write(marks: torch.Tensor) -> torch.Tensor:
        """Write the same per-(slot, dim) mark as key and value of every slot; return the page."""
        page = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = page.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        tokens = marks.to(dtype)[:, None, :]  # [slots, heads=1, head_size]
        ops.cpu_attn_reshape_and_cache(tokens, tokens, key_cache, value_cache, slots, isa)
        return page.reshape(-1).float().long() - 1

    dims = torch.arange(head_size)
    slot_of = write((slots[:, None] + 1).expand(block_size, head_size))
    dim_low = write((dims % _PROBE_RADIX + 1).expand(block_size, head_size))
    dim_high = write((dims // _PROBE_RADIX + 1).expand(block_size, head_size))
    dim_of = dim_high * _PROBE_RADIX + dim_low
    is_value = (torch.arange(slot_of.numel()) >= block_size * head_size).long()
    token_index = torch.full((block_size, 2 * head_size), -1, dtype=torch.long)
    token_index[slot_of, is_value * head_size + dim_of] = torch.arange(slot_of.numel())
    if (token_index < 0).any():
        raise RuntimeError(f"could not map the CPU attention page layout (isa={isa}, dtype={dtype})")
    return token_index


class PagedKVCompactor:
    """Moves kept tokens into a request's leading slots in every layer's KV cache."""

    def __init__(self, layer_caches: list[torch.Tensor], token_index: torch.Tensor) -> None:
        # [blocks, kv_heads, elements per page] views of each layer's cache
        self.pages = [cache.view(cache.shape[0], cache.shape[1], -1) for cache in layer_caches]
        self.token_index = token_index
        self.block_size = token_index.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.pages)

    @property
    def num_kv_heads(self) -> int:
        return self.pages[0].shape[1]

    def compact(self, block_ids: list[int], keep: torch.Tensor) -> None:
        """keep: [layers, kv_heads, kept_len] ascending token indices of the request's current slots."""
        block_table = torch.tensor([block_ids], dtype=torch.int32)
        n_keep = torch.tensor([keep.shape[-1]], dtype=torch.int32)
        for pages, layer_keep in zip(self.pages, keep):
            compact_pages_torch(pages, self.token_index, block_table, layer_keep[None], n_keep)
