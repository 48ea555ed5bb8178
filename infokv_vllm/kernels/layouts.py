"""Where each slot's key and value sit inside a layer's KV cache tensor: the page layouts the kernels read and write.

Which layout a worker has is its attention backend's business; each platform adapter (`platforms/`) builds one.
Every layout offers strided key and value planes where its pages allow them (what the Triton kernels take); a
layout that is not affine gives a per-slot element index for the torch kernels instead.
"""

from __future__ import annotations

import torch


class PageLayout:
    """Where each slot's key and value sit in a layer's KV cache tensor.

    Every layout offers `planes`: keys and values as [blocks, kv_heads, block_size, head_size] views, the form
    the Triton kernels and the torch plane path take. A layout that is not affine (no such strided view) gives
    `token_index` instead, for the torch kernels to index through.
    """

    def __init__(self, block_size: int, head_size: int) -> None:
        self.block_size = block_size
        self.head_size = head_size

    token_index: torch.Tensor | None = None
    strided = True  # whether `planes` gives strided views (else only `token_index` reaches the elements)

    def planes(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def block_plane(self, cache: torch.Tensor, blocks: torch.Tensor, values: bool = False) -> torch.Tensor:
        """The keys (or values) of whole blocks [n] as [n, kv_heads, block_size, head_size] (copied: whole pages
        are read, which is far faster than gathering slot by slot)."""
        return self.planes(cache)[int(values)][blocks]


class HeadMajorPageLayout(PageLayout):
    """vLLM 0.32's GPU attention caches: each layer's cache is a logical [blocks, kv_heads, block_size,
    2 * head_size] view (keys, then values, in the last dim), whatever its physical stride order
    (`VLLM_KV_CACHE_LAYOUT`); FLASH_ATTN and TRITON_ATTN split it as `kv_cache.transpose(1, 2).split(head_size)`.
    """

    def planes(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (self.block_size, 2 * self.head_size)
        if cache.dim() != 4 or tuple(cache.shape[2:]) != expected:
            raise ValueError(f"expected a [blocks, kv_heads, {expected[0]}, {expected[1]}] KV cache view, got "
                             f"{tuple(cache.shape)}")
        return cache[..., : self.head_size], cache[..., self.head_size:]


class IndexedPageLayout(PageLayout):
    """A layout given element by element: a layer's cache seen as [blocks, kv_heads, elements per page], and
    `token_index[slot]` lists the page elements of that slot, keys in the first head_size columns, values in the
    rest (vLLM's CPU attention, whose layout is probed: `platforms/cpu.py`)."""

    def __init__(self, token_index: torch.Tensor) -> None:
        super().__init__(token_index.shape[0], token_index.shape[1] // 2)
        self.token_index = token_index
        # (offset, slot stride, dim stride) of the key and of the value elements, where the layout is affine
        # (vLLM's CPU "vec" pages are: keys column-major, values row-major); found once, as the index is fixed.
        halves = (token_index[:, : self.head_size].cpu(), token_index[:, self.head_size:].cpu())
        self._strides = [self._affine_strides(index) for index in halves]
        # The element range [low, high) of each page that holds its keys, and its values
        self._spans = [(int(index.min()), int(index.max()) + 1) for index in halves]

    def _affine_strides(self, index: torch.Tensor) -> tuple[int, int, int] | None:
        offset = int(index[0, 0])
        slot_stride = int(index[1, 0] - index[0, 0]) if self.block_size > 1 else 0
        dim_stride = int(index[0, 1] - index[0, 0]) if self.head_size > 1 else 0
        expected = offset + torch.arange(self.block_size)[:, None] * slot_stride \
            + torch.arange(self.head_size)[None, :] * dim_stride
        return (offset, slot_stride, dim_stride) if torch.equal(index, expected) else None

    @property
    def strided(self) -> bool:  # type: ignore[override]
        return None not in self._strides

    def pages(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(cache.shape[0], cache.shape[1], -1)

    def block_plane(self, cache: torch.Tensor, blocks: torch.Tensor, values: bool = False) -> torch.Tensor:
        strides = self._strides[int(values)]
        if strides is None:
            start = self.head_size * int(values)
            return self.pages(cache)[blocks][..., self.token_index[:, start: start + self.head_size]]
        # The pages' key (or value) range copied whole, then seen as a plane: indexing the strided plane itself
        # gathers element by element, 3-5x slower on CPU.
        offset, slot_stride, dim_stride = strides
        low, high = self._spans[int(values)]
        span = self.pages(cache)[:, :, low:high].index_select(0, blocks)
        return span.as_strided((len(blocks), span.shape[1], self.block_size, self.head_size),
                               (span.stride(0), span.stride(1), slot_stride, dim_stride), offset - low)

    def planes(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided views, where the layout is affine."""
        if not self.strided:
            raise ValueError("this KV page layout is not a strided view; use the torch kernels")
        key_strides, value_strides = self._strides
        return self._plane(cache, key_strides), self._plane(cache, value_strides)

    def _plane(self, cache: torch.Tensor, strides: tuple[int, int, int]) -> torch.Tensor:
        """[blocks, kv_heads, block_size, head_size] view of the elements at offset + slot * s + dim * d."""
        offset, slot_stride, dim_stride = strides
        pages = self.pages(cache)
        return pages.as_strided(
            (pages.shape[0], pages.shape[1], self.block_size, self.head_size),
            (pages.stride(0), pages.stride(1), slot_stride * pages.stride(2), dim_stride * pages.stride(2)),
            pages.storage_offset() + offset * pages.stride(2))
