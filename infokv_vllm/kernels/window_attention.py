"""Window attention accumulation: add the softmax mass that a request's observation-window queries give each
cached slot into a per-slot float32 buffer laid out like the KV pages.

Keys are read from a paged plane [num_blocks, num_kv_heads, block_size, head_size] (a strided view of the
backend's cache) through the request's block table; the accumulator is [num_blocks, num_kv_heads, block_size].
One program handles one (window query, KV head): it walks the request's slots twice, first for the softmax
maximum and normaliser of every query head in the KV head's group (online, in float32), then to add each
slot's probability summed over the group. Slots after the query's own position are masked (causal). Several
queries of a request add into the same slots, so the adds are atomic.

Reference: `infokv_vllm.signals.attention.window_attention_mass` (dense torch), tested under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window_attention_kernel(
    query_ptr, key_ptr, block_table_ptr, acc_ptr,
    query_request_ptr, query_position_ptr, seq_len_ptr,
    stride_q_token, stride_q_head, stride_q_dim,
    stride_k_block, stride_k_head, stride_k_slot, stride_k_dim,
    stride_table_req,
    stride_acc_block, stride_acc_head, stride_acc_slot,
    scale,
    GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SLOT_TILE: tl.constexpr,
):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    request = tl.load(query_request_ptr + token)
    position = tl.load(query_position_ptr + token)  # the query's own slot: it attends slots 0..position
    length = tl.minimum(tl.load(seq_len_ptr + request), position + 1)

    group = tl.arange(0, GROUP_TILE)
    dims = tl.arange(0, DIM_TILE)
    group_mask = group < GROUP
    q = tl.load(query_ptr + token * stride_q_token + (kv_head * GROUP + group)[:, None] * stride_q_head
                + dims[None, :] * stride_q_dim,
                mask=group_mask[:, None] & (dims < HEAD_DIM)[None, :], other=0.0).to(tl.float32)

    slots = tl.arange(0, SLOT_TILE)
    row_max = tl.full((GROUP_TILE,), float("-inf"), tl.float32)
    row_sum = tl.zeros((GROUP_TILE,), tl.float32)
    for start in range(0, length, SLOT_TILE):
        logits = _tile_logits(q, key_ptr, block_table_ptr + request * stride_table_req, kv_head, start + slots,
                              length, dims, stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                              HEAD_DIM, BLOCK_SIZE)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max

    for start in range(0, length, SLOT_TILE):
        slot = start + slots
        logits = _tile_logits(q, key_ptr, block_table_ptr + request * stride_table_req, kv_head, slot, length,
                              dims, stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                              HEAD_DIM, BLOCK_SIZE)
        probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
        probs = tl.where(group_mask[:, None], probs, 0.0)
        mass = tl.sum(probs, axis=0)
        in_range = slot < length
        block = tl.load(block_table_ptr + request * stride_table_req + slot // BLOCK_SIZE, mask=in_range, other=0)
        target = acc_ptr + block.to(tl.int64) * stride_acc_block + kv_head * stride_acc_head \
            + (slot % BLOCK_SIZE) * stride_acc_slot
        tl.atomic_add(target, mass, mask=in_range)


@triton.jit
def _tile_logits(q, key_ptr, table_row_ptr, kv_head, slot, length, dims,
                 stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """[GROUP_TILE, SLOT_TILE] scaled logits of the group's query heads against a tile of slots (-inf past
    `length`)."""
    in_range = slot < length
    block = tl.load(table_row_ptr + slot // BLOCK_SIZE, mask=in_range, other=0)
    keys = tl.load(key_ptr + block.to(tl.int64)[:, None] * stride_k_block + kv_head * stride_k_head
                   + (slot % BLOCK_SIZE)[:, None] * stride_k_slot + dims[None, :] * stride_k_dim,
                   mask=in_range[:, None] & (dims < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    logits = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
    return tl.where(in_range[None, :], logits * scale, float("-inf"))


def accumulate_window_attention_triton(queries: torch.Tensor, keys: torch.Tensor, block_table: torch.Tensor,
                                       accumulator: torch.Tensor, query_requests: torch.Tensor,
                                       query_positions: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                       slot_tile: int = 32) -> None:
    """queries [T, q_heads, D] (window queries only); keys [blocks, kv_heads, block_size, D];
    block_table [reqs, max_blocks] int32; accumulator [blocks, kv_heads, block_size] float32 (added into);
    query_requests [T] (row of block_table), query_positions [T] (physical slot of each query), seq_lens [reqs]."""
    num_tokens, q_heads, head_dim = queries.shape
    kv_heads, block_size = keys.shape[1], keys.shape[2]
    if num_tokens == 0:
        return
    group = q_heads // kv_heads
    _window_attention_kernel[(num_tokens, kv_heads)](
        queries, keys, block_table, accumulator, query_requests, query_positions, seq_lens,
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        block_table.stride(0),
        accumulator.stride(0), accumulator.stride(1), accumulator.stride(2),
        scale,
        GROUP=group, GROUP_TILE=max(2, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_TILE=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, SLOT_TILE=slot_tile,
    )
