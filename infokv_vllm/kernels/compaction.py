"""KV compaction: move each (request, KV head)'s kept tokens into the request's leading slots.

A paged KV "plane" is any per-slot tensor of one layer viewed as [num_blocks, num_kv_heads, block_size, width]
(keys, values, score accumulators, ...); callers build these views from their backend's cache layout, so the
kernel is layout-agnostic. For request r and KV head h, `keep[r, h, :n_keep[r]]` lists, in ascending order, the
current (physical) token indices to keep; token index i lives in block `block_table[r, i // block_size]` at
offset `i % block_size`. After compaction, kept token j of (r, h) sits at token index j.

Source and destination overlap. Because the kept indices ascend, keep[j] >= j: the slot written for kept
token j is never the source of a later kept token. One program per (request, head) therefore walks the kept
tokens in ascending chunks, loading a whole chunk before storing it (a barrier separates the two), and no
temporary copy of the cache is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_plane_kernel(
    plane_ptr, block_table_ptr, keep_ptr, n_keep_ptr,
    stride_block, stride_head, stride_slot, stride_width,
    stride_table_req, stride_keep_req, stride_keep_head,
    width,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, WIDTH_TILE: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    n_keep = tl.load(n_keep_ptr + req)
    chunk_offsets = tl.arange(0, CHUNK)
    width_offsets = tl.arange(0, WIDTH_TILE)
    head_base = plane_ptr + head * stride_head
    for start in range(0, n_keep, CHUNK):
        dst_index = start + chunk_offsets
        in_range = dst_index < n_keep
        src_index = tl.load(keep_ptr + req * stride_keep_req + head * stride_keep_head + dst_index,
                            mask=in_range, other=0)
        src_block = tl.load(block_table_ptr + req * stride_table_req + src_index // BLOCK_SIZE, mask=in_range,
                            other=0)
        dst_block = tl.load(block_table_ptr + req * stride_table_req + dst_index // BLOCK_SIZE, mask=in_range,
                            other=0)
        src_row = src_block.to(tl.int64) * stride_block + (src_index % BLOCK_SIZE) * stride_slot
        dst_row = dst_block.to(tl.int64) * stride_block + (dst_index % BLOCK_SIZE) * stride_slot
        for width_start in range(0, width, WIDTH_TILE):
            column = width_start + width_offsets
            mask = in_range[:, None] & (column < width)[None, :]
            values = tl.load(head_base + src_row[:, None] + column[None, :] * stride_width, mask=mask)
            # Every load of this chunk must land before any store: a store may hit a slot another lane of
            # the same chunk still has to read.
            tl.debug_barrier()
            tl.store(head_base + dst_row[:, None] + column[None, :] * stride_width, values, mask=mask)
            tl.debug_barrier()


def compact_plane_triton(plane: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor,
                         n_keep: torch.Tensor, chunk: int = 32) -> None:
    """Compact one plane in place. plane: [blocks, heads, block_size, width]; block_table: [reqs, max_blocks]
    (int32); keep: [reqs, heads, max_keep] (int32, ascending per row); n_keep: [reqs] (int32)."""
    num_requests, num_heads = keep.shape[0], keep.shape[1]
    if num_requests == 0:
        return
    assert plane.shape[1] == num_heads, (plane.shape, keep.shape)
    width = plane.shape[3]
    _compact_plane_kernel[(num_requests, num_heads)](
        plane, block_table, keep, n_keep,
        plane.stride(0), plane.stride(1), plane.stride(2), plane.stride(3),
        block_table.stride(0), keep.stride(0), keep.stride(1),
        width,
        BLOCK_SIZE=plane.shape[2], CHUNK=chunk, WIDTH_TILE=min(128, triton.next_power_of_2(width)),
    )


def _moves(block_table: torch.Tensor, keep: torch.Tensor, n_keep: torch.Tensor, block_size: int):
    """Per request with kept tokens: (source blocks, source offsets, target blocks, target offsets), each
    [heads, kept], for moving kept token keep[r, h, j] to token index j."""
    for req in range(keep.shape[0]):
        count = int(n_keep[req])
        if count == 0:
            continue
        table = block_table[req].long()
        src = keep[req, :, :count].long()
        dst = torch.arange(count, device=keep.device).expand_as(src)
        yield table[src // block_size], src % block_size, table[dst // block_size], dst % block_size


def compact_pages_torch(pages: torch.Tensor, token_index: torch.Tensor, block_table: torch.Tensor,
                        keep: torch.Tensor, n_keep: torch.Tensor) -> None:
    """The same operation with torch indexing, for any layout inside a page.

    pages: [blocks, heads, elements per page]; token_index: [block_size, width], the page elements that hold
    each slot's data (vLLM's CPU attention stores keys column-major, so a slot's elements need not be
    contiguous). The gather copies before the scatter writes, so overlap is harmless. Used where Triton cannot
    run natively (vLLM on CPU).
    """
    heads = torch.arange(pages.shape[1], device=pages.device)[:, None, None]
    for src_block, src_offset, dst_block, dst_offset in _moves(block_table, keep, n_keep, token_index.shape[0]):
        values = pages[src_block[..., None], heads, token_index[src_offset]]
        pages[dst_block[..., None], heads, token_index[dst_offset]] = values


def compact_plane_torch(plane: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor,
                        n_keep: torch.Tensor) -> None:
    """`compact_plane_triton` with torch indexing, on any strided plane [blocks, heads, block_size, width]
    (indexed writes go through views). The gather copies before the scatter writes, so overlap is harmless."""
    heads = torch.arange(plane.shape[1], device=plane.device)[:, None]
    for src_block, src_offset, dst_block, dst_offset in _moves(block_table, keep, n_keep, plane.shape[2]):
        plane[dst_block, heads, dst_offset] = plane[src_block, heads, src_offset]


def compact_layers_torch(planes: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor) -> None:
    """`compact_plane_torch` for one request in every layer at once: planes [layers, blocks, heads, block_size],
    block_table [1, blocks], keep [layers, heads, kept] (each (layer, head) row is moved as a head of one request
    would be). One gather and one scatter for all layers; the gather copies first, so overlap is harmless."""
    layers, _, heads, block_size = planes.shape
    layer = torch.arange(layers, device=planes.device)[:, None, None]
    head = torch.arange(heads, device=planes.device)[None, :, None]
    n_keep = torch.tensor([keep.shape[-1]])
    for src_block, src_offset, dst_block, dst_offset in _moves(block_table, keep.flatten(0, 1)[None], n_keep,
                                                               block_size):
        src_block, src_offset, dst_block, dst_offset = (index.view(keep.shape) for index in (
            src_block, src_offset, dst_block, dst_offset))
        planes[layer, dst_block, head, dst_offset] = planes[layer, src_block, head, src_offset]
