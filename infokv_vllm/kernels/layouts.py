"""Where each slot's key and value sit inside a layer's KV cache tensor: the page layouts the kernels read and write.

Which layout a worker has is its attention backend's business; each platform adapter (`platforms/`) builds one.
Every layout offers strided key and value planes where its pages allow them (what the Triton kernels take); a
layout that is not affine gives a per-slot element index for the torch kernels instead. `LayerQuantization` says
what the numbers there mean (full precision, or fp8 bytes with per-tensor scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerQuantization:
    """What the numbers of one attention layer's KV cache (and the queries its attention op receives) mean.

    A full-precision cache holds the keys and values themselves. vLLM's per-tensor fp8 caches (`--kv-cache-dtype`
    fp8, fp8_e4m3, fp8_e5m2) hold bytes (a uint8 tensor) that are 8-bit floats of `float8`, with one scale per
    layer for keys and one for values: a key is its stored value times `key_scale`. Moving bytes between slots is
    exact under such scales, so compaction moves them as they are; whatever reads keys or values reads them
    through `readable` and the scales. Some backends also receive fp8 queries (vLLM quantizes them for FLASH_ATTN
    and TRITON_ATTN on CUDA when the cache is fp8): `query_scales` is then their scale, one per tensor or one per
    KV head's group of query heads.
    """

    float8: torch.dtype | None = None  # the 8-bit float an fp8 cache's bytes hold; None: a full-precision cache
    key_scale: float = 1.0
    value_scale: float = 1.0
    query_scales: torch.Tensor | None = None  # [1] or [kv_heads]: the queries arrive as fp8 times these

    def readable(self, cache: torch.Tensor) -> torch.Tensor:
        """The cache as the kernels read it: an fp8 cache's bytes seen as `float8` (same shape and strides)."""
        return cache if self.float8 is None else cache.view(self.float8)

    def dequantized(self, stored: torch.Tensor, values: bool = False) -> torch.Tensor:
        """Keys (or values) read from `readable(cache)`, as the model computed them: float32 from an fp8 cache,
        unchanged from a full-precision one."""
        if self.float8 is None:
            return stored
        return stored.float() * (self.value_scale if values else self.key_scale)

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """The queries [tokens, q_heads, head_size] the attention op received, as the model computed them."""
        if self.query_scales is None:
            return query
        groups = self.query_scales.to(query.device, torch.float32)
        return (query.float().unflatten(1, (groups.numel(), -1)) * groups[:, None, None]).flatten(1, 2)

    def query_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the kernels receive queries in (`queries` dequantizes fp8 queries to float32)."""
        return model_dtype if self.query_scales is None else torch.float32


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
