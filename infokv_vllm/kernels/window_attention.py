"""Window attention accumulation: add the softmax mass that a request's observation-window queries give each
cached slot into a per-slot float32 buffer laid out like the KV pages.

Keys are read from a paged plane [num_blocks, num_kv_heads, block_size, head_size] (a strided view of the
backend's cache) through the request's block table; the accumulator is [num_blocks, num_kv_heads, block_size].
One program handles one (request, KV head): the request's window queries are consecutive in the query list, and
the program of the first one takes them all (the others return at once), as one matrix of (query, query head of
the KV head's group) rows. It walks the request's slots twice with matrix products (tensor cores on a GPU),
first for every row's softmax maximum and normaliser (online, in float32), then to add each slot's probability
summed over the rows. Reading the keys twice per request, not twice per query, keeps it memory-bound: a
per-query walk would read them twice per window query. Slots after a query's own position are masked (causal).
Each slot of a (request, KV head) has one program, so the adds need no atomics.

Reference: `window_attention_mass` below (dense torch, also the torch family's path), tested against the kernel
under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window_attention_kernel(
    query_ptr, key_ptr, block_table_ptr, acc_ptr,
    query_request_ptr, query_position_ptr, seq_len_ptr, num_tokens,
    stride_q_token, stride_q_head, stride_q_dim,
    stride_k_block, stride_k_head, stride_k_slot, stride_k_dim,
    stride_table_req,
    stride_acc_block, stride_acc_head, stride_acc_slot,
    scale,
    GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, QUERY_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLOT_TILE: tl.constexpr, DOT_FLOAT32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    first = tl.program_id(0)
    kv_head = tl.program_id(1)
    request = tl.load(query_request_ptr + first)
    previous = tl.load(query_request_ptr + first - 1, mask=first > 0, other=-1)
    if previous == request:  # not the request's first window query: that one's program does them all
        return
    length = tl.load(seq_len_ptr + request)
    table_row = block_table_ptr + request * stride_table_req

    # Rows of the query matrix: (window query, query head of this KV head's group), QUERY_TILE queries at a time.
    row = tl.arange(0, QUERY_TILE * GROUP_TILE)
    head = row % GROUP_TILE
    dims = tl.arange(0, DIM_TILE)
    slots = tl.arange(0, SLOT_TILE)
    chunk = first
    in_request = request >= 0
    while in_request:
        token = chunk + row // GROUP_TILE
        row_valid = (token < num_tokens) & (head < GROUP)
        row_valid = row_valid & (tl.load(query_request_ptr + token, mask=row_valid, other=-1) == request)
        q = tl.load(query_ptr + token[:, None] * stride_q_token + (kv_head * GROUP + head)[:, None] * stride_q_head
                    + dims[None, :] * stride_q_dim,
                    mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
        if DOT_FLOAT32:
            q = q.to(tl.float32)
        # Rows that are padding attend everything with zero logits: finite statistics, masked out of the mass.
        position = tl.load(query_position_ptr + token, mask=row_valid, other=length - 1)
        end = tl.max(tl.minimum(position + 1, length), axis=0)

        row_max = tl.full((QUERY_TILE * GROUP_TILE,), float("-inf"), tl.float32)
        row_sum = tl.zeros((QUERY_TILE * GROUP_TILE,), tl.float32)
        for start in range(0, end, SLOT_TILE):
            logits = _tile_logits(q, key_ptr, table_row, kv_head, start + slots, position, length, dims,
                                  stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                                  HEAD_DIM, BLOCK_SIZE, DOT_FLOAT32, PRECISION)
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # finite from the first tile: slot 0 is visible
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max

        for start in range(0, end, SLOT_TILE):
            slot = start + slots
            logits = _tile_logits(q, key_ptr, table_row, kv_head, slot, position, length, dims,
                                  stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                                  HEAD_DIM, BLOCK_SIZE, DOT_FLOAT32, PRECISION)
            probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
            mass = tl.sum(tl.where(row_valid[:, None], probs, 0.0), axis=0)
            in_range = slot < end
            block = tl.load(table_row + slot // BLOCK_SIZE, mask=in_range, other=0)
            target = acc_ptr + block.to(tl.int64) * stride_acc_block + kv_head * stride_acc_head \
                + (slot % BLOCK_SIZE) * stride_acc_slot
            tl.store(target, tl.load(target, mask=in_range, other=0.0) + mass, mask=in_range)

        chunk += QUERY_TILE
        next_request = tl.load(query_request_ptr + chunk, mask=chunk < num_tokens, other=-1)
        in_request = next_request == request


@triton.jit
def _tile_logits(q, key_ptr, table_row_ptr, kv_head, slot, position, length, dims,
                 stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FLOAT32: tl.constexpr,
                 PRECISION: tl.constexpr):
    """[rows, SLOT_TILE] scaled logits of the query rows against a tile of slots (-inf past `length` and past
    each row's own position)."""
    in_range = slot < length
    block = tl.load(table_row_ptr + slot // BLOCK_SIZE, mask=in_range, other=0)
    keys = tl.load(key_ptr + block.to(tl.int64)[:, None] * stride_k_block + kv_head * stride_k_head
                   + (slot % BLOCK_SIZE)[:, None] * stride_k_slot + dims[None, :] * stride_k_dim,
                   mask=in_range[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    if DOT_FLOAT32:
        keys = keys.to(tl.float32)
    logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
    visible = in_range[None, :] & (slot[None, :] <= position[:, None])
    return tl.where(visible, logits * scale, float("-inf"))


def accumulate_window_attention_triton(queries: torch.Tensor, keys: torch.Tensor, block_table: torch.Tensor,
                                       accumulator: torch.Tensor, query_requests: torch.Tensor,
                                       query_positions: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                       slot_tile: int = 64) -> None:
    """queries [T, q_heads, D] (window queries only, each request's consecutive); keys [blocks, kv_heads,
    block_size, D]; block_table [reqs, max_blocks] int32; accumulator [blocks, kv_heads, block_size] float32
    (added into); query_requests [T] (row of block_table), query_positions [T] (physical slot of each query),
    seq_lens [reqs]."""
    num_tokens, q_heads, head_dim = queries.shape
    kv_heads, block_size = keys.shape[1], keys.shape[2]
    if num_tokens == 0:
        return
    group = q_heads // kv_heads
    group_tile = triton.next_power_of_2(group)
    # Queries of one request per pass over its keys: all of a prefill window where they fit in 128 rows (the
    # matrix product needs at least 16).
    dot_float32 = keys.device.type == "cpu" and keys.dtype == torch.bfloat16
    query_tile = max(16 // group_tile, min(triton.next_power_of_2(num_tokens), max(1, 128 // group_tile)))
    _window_attention_kernel[(num_tokens, kv_heads)](
        queries, keys, block_table, accumulator, query_requests, query_positions, seq_lens, num_tokens,
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        block_table.stride(0),
        accumulator.stride(0), accumulator.stride(1), accumulator.stride(2),
        scale,
        GROUP=group, GROUP_TILE=group_tile, QUERY_TILE=query_tile, HEAD_DIM=head_dim,
        DIM_TILE=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, SLOT_TILE=slot_tile,
        # On CPU tensors the kernel runs under Triton's interpreter, whose products of bfloat16 matrices are wrong
        # (numpy has no bfloat16): there they are taken in float32. On a GPU, half precision uses tensor cores.
        DOT_FLOAT32=dot_float32,
        # float32 products exact (TF32 would round the logits)
        PRECISION="ieee" if keys.dtype == torch.float32 or dot_float32 else "tf32",
        num_warps=8 if query_tile * group_tile >= 64 else 4,
    )


def window_attention_mass(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """queries [..., T, q_heads, D], keys [..., kv_heads, S, D], query_positions [..., T] (physical slot of each
    query, which attends slots 0..position) -> [..., kv_heads, S] summed probabilities. Leading dims batch
    requests."""
    *batch, num_tokens, q_heads, _ = queries.shape
    kv_heads, length = keys.shape[-3], keys.shape[-2]
    group = q_heads // kv_heads
    grouped = queries.float().view(*batch, num_tokens, kv_heads, group, -1)
    logits = torch.einsum("...tkgd,...ksd->...tkgs", grouped, keys.float()) * scale
    future = torch.arange(length, device=keys.device) > query_positions[..., None]
    logits.masked_fill_(future[..., None, None, :], float("-inf"))
    return logits.softmax(dim=-1).sum(dim=(-4, -2))
