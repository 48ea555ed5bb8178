"""Applying a compaction to one worker's KV cache: every layer, every local KV head.

Which tokens stay is the scoring policy's choice (per layer and KV head, equal counts); where their bytes live
inside a page is the attention backend's business, described by a `PageLayout` (`kernels/layouts.py`) that each
platform adapter provides (`platforms/`). How the bytes move is the worker's kernel family (`kernels/families.py`);
they move as they are, fp8 ones included (exact under per-tensor scales), and only what reads them dequantises.
"""

from __future__ import annotations

import torch

from infokv_vllm.kernels.families import KernelFamily
from infokv_vllm.kernels.layouts import LayerQuantization, PageLayout


class PagedKVCompactor:
    """Moves kept tokens into a request's leading slots in every layer's KV cache."""

    def __init__(self, layer_caches: list[torch.Tensor], quantizations: list[LayerQuantization], layout: PageLayout,
                 num_kv_heads: int, kernels: KernelFamily) -> None:
        self.caches = layer_caches
        self.quantizations = quantizations
        self.layout = layout
        self.num_kv_heads = num_kv_heads
        self.kernels = kernels

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    def read(self, block_ids: list[int], length: int, values: bool = False) -> torch.Tensor:
        """The keys (or values) of a request's first `length` slots, [layers, kv_heads, length, head_size] (a
        copy), dequantised from an fp8 cache."""
        blocks = torch.tensor(block_ids[: -(-length // self.block_size)], dtype=torch.long,
                              device=self.caches[0].device)
        return torch.stack([
            quantization.dequantized(self.layout.block_plane(quantization.readable(cache), blocks, values), values)
            .transpose(0, 1).flatten(1, 2)[:, :length] for cache, quantization in zip(self.caches, self.quantizations)])

    def copy_blocks(self, sources: list[int], destinations: list[int]) -> None:
        """Copy whole blocks in every layer (a page's layout does not matter: dim 0 indexes blocks)."""
        device = self.caches[0].device
        sources = torch.tensor(sources, dtype=torch.long, device=device)
        destinations = torch.tensor(destinations, dtype=torch.long, device=device)
        for cache in self.caches:
            cache[destinations] = cache[sources]

    def compact(self, block_ids: list[int], keep: torch.Tensor) -> None:
        """keep: [layers, kv_heads, kept_len] ascending token indices of the request's current slots."""
        device = self.caches[0].device
        block_table = torch.tensor([block_ids], dtype=torch.int32, device=device)
        n_keep = torch.tensor([keep.shape[-1]], dtype=torch.int32, device=device)
        for cache, layer_keep in zip(self.caches, keep.to(device=device, dtype=torch.int32)):
            self.kernels.compact_kv(cache, self.layout, block_table, layer_keep[None], n_keep)
