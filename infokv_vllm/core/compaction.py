"""Applying a compaction to one worker's KV cache: every layer, every local KV head.

Which tokens stay is the scoring policy's choice (per layer and KV head, equal counts); where their bytes live
inside a page is the attention backend's business, described by a `PageLayout` that each platform adapter
provides (`platforms/`). How the bytes move is the worker's kernel family (`infokv_vllm.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.kernels import KernelFamily


@dataclass(frozen=True)
class PageLayout:
    """Where each slot's key and value elements sit inside the KV page of one (block, KV head).

    A layer's cache is seen as [blocks, kv_heads, elements per page]; `token_index[slot]` lists the page elements
    of that slot, keys in the first head_size columns, values in the rest.
    """

    token_index: torch.Tensor  # [block_size, 2 * head_size]

    @property
    def block_size(self) -> int:
        return self.token_index.shape[0]

    @property
    def head_size(self) -> int:
        return self.token_index.shape[1] // 2

    @property
    def key_index(self) -> torch.Tensor:
        return self.token_index[:, : self.head_size]

    def pages(self, cache: torch.Tensor) -> torch.Tensor:
        """A layer's cache as [blocks, kv_heads, elements per page]."""
        return cache.view(cache.shape[0], cache.shape[1], -1)

    def gather_keys(self, cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The keys of slots (blocks[i], offsets[i]) as [kv_heads, slots, head_size]."""
        return self.pages(cache)[blocks[:, None], :, self.key_index[offsets]].permute(2, 0, 1)

    def planes(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a layer's cache as strided [blocks, kv_heads, block_size, head_size] views, the form
        the Triton kernels take. Needs an affine layout (vLLM's CPU "vec" pages are: keys column-major, values
        row-major)."""
        pages = self.pages(cache)
        views = []
        for index in (self.key_index, self.token_index[:, self.head_size:]):
            offset = int(index[0, 0])
            slot_stride = int(index[1, 0] - index[0, 0]) if self.block_size > 1 else 0
            dim_stride = int(index[0, 1] - index[0, 0]) if self.head_size > 1 else 0
            expected = offset + torch.arange(self.block_size)[:, None] * slot_stride \
                + torch.arange(self.head_size)[None, :] * dim_stride
            if not torch.equal(index.cpu(), expected):
                raise ValueError("this KV page layout is not a strided view; use the torch kernels")
            views.append(pages.as_strided(
                (pages.shape[0], pages.shape[1], self.block_size, self.head_size),
                (pages.stride(0), pages.stride(1), slot_stride * pages.stride(2), dim_stride * pages.stride(2)),
                pages.storage_offset() + offset * pages.stride(2)))
        return views[0], views[1]


class PagedKVCompactor:
    """Moves kept tokens into a request's leading slots in every layer's KV cache."""

    def __init__(self, layer_caches: list[torch.Tensor], layout: PageLayout, num_kv_heads: int,
                 kernels: KernelFamily) -> None:
        self.caches = layer_caches
        self.layout = layout
        self.num_kv_heads = num_kv_heads
        self.kernels = kernels

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def compact(self, block_ids: list[int], keep: torch.Tensor) -> None:
        """keep: [layers, kv_heads, kept_len] ascending token indices of the request's current slots."""
        device = self.caches[0].device
        block_table = torch.tensor([block_ids], dtype=torch.int32, device=device)
        n_keep = torch.tensor([keep.shape[-1]], dtype=torch.int32, device=device)
        for cache, layer_keep in zip(self.caches, keep.to(device=device, dtype=torch.int32)):
            self.kernels.compact_kv(cache, self.layout, block_table, layer_keep[None], n_keep)
