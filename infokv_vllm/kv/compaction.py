"""Applying a compaction to one worker's KV cache: every layer, every local KV head.

Which tokens stay is the scoring policy's choice (per layer and KV head, equal counts); where their bytes live
inside a page is the attention backend's business. vLLM's CPU attention stores a page's keys column-major and
its values row-major (the layout depends on the instruction set), so instead of hard-coding it we write a
marked page through the backend's own cache-write op once and read back where each slot's elements landed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.kernels.compaction import compact_pages_torch, compact_plane_triton

# Probe values stay below 256 so they are exact in every cache dtype (float32, bfloat16, float16).
_PROBE_RADIX = 128


def probe_cpu_page_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> PageLayout:
    """The layout of vLLM's CPU attention pages (K half, then V half) for this dtype and instruction set."""
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
    return PageLayout(token_index)


@dataclass(frozen=True)
class PageLayout:
    """Where each slot's key and value elements sit inside a KV page of one (block, KV head)."""

    token_index: torch.Tensor  # [block_size, 2 * head_size]: keys in the first head_size columns

    @property
    def block_size(self) -> int:
        return self.token_index.shape[0]

    @property
    def head_size(self) -> int:
        return self.token_index.shape[1] // 2

    @property
    def key_index(self) -> torch.Tensor:
        return self.token_index[:, : self.head_size]

    def planes(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a layer's cache [blocks, kv_heads, ...] as strided [blocks, kv_heads, block_size,
        head_size] views, the form the Triton kernels take. Needs an affine layout (vLLM's CPU "vec" pages are:
        keys column-major, values row-major)."""
        pages = cache.view(cache.shape[0], cache.shape[1], -1)
        views = []
        for index in (self.key_index, self.token_index[:, self.head_size:]):
            offset = int(index[0, 0])
            slot_stride = int(index[1, 0] - index[0, 0]) if self.block_size > 1 else 0
            dim_stride = int(index[0, 1] - index[0, 0]) if self.head_size > 1 else 0
            expected = offset + torch.arange(self.block_size)[:, None] * slot_stride \
                + torch.arange(self.head_size)[None, :] * dim_stride
            if not torch.equal(index, expected):
                raise ValueError("this KV page layout is not a strided view; use the torch kernels")
            views.append(pages.as_strided(
                (pages.shape[0], pages.shape[1], self.block_size, self.head_size),
                (pages.stride(0), pages.stride(1), slot_stride * pages.stride(2), dim_stride * pages.stride(2)),
                pages.storage_offset() + offset * pages.stride(2)))
        return views[0], views[1]


class PagedKVCompactor:
    """Moves kept tokens into a request's leading slots in every layer's KV cache.

    `use_triton` runs the Triton kernel on strided key/value planes (the GPU path; on CPU only under
    TRITON_INTERPRET=1), otherwise torch indexing through the page layout.
    """

    def __init__(self, layer_caches: list[torch.Tensor], layout: PageLayout, use_triton: bool) -> None:
        self.layout = layout
        self.use_triton = use_triton
        if use_triton:
            self.layers = [layout.planes(cache) for cache in layer_caches]
        else:  # [blocks, kv_heads, elements per page] views of each layer's cache
            self.layers = [cache.view(cache.shape[0], cache.shape[1], -1) for cache in layer_caches]
        self.num_kv_heads = layer_caches[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def compact(self, block_ids: list[int], keep: torch.Tensor) -> None:
        """keep: [layers, kv_heads, kept_len] ascending token indices of the request's current slots."""
        block_table = torch.tensor([block_ids], dtype=torch.int32)
        n_keep = torch.tensor([keep.shape[-1]], dtype=torch.int32)
        for layer, layer_keep in zip(self.layers, keep.to(torch.int32)):
            if self.use_triton:
                for plane in layer:
                    compact_plane_triton(plane, block_table, layer_keep[None], n_keep)
            else:
                compact_pages_torch(layer, self.layout.token_index, block_table, layer_keep[None], n_keep)
