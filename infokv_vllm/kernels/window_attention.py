"""Window attention accumulation: add the softmax mass that a request's observation-window queries give each
cached slot into a per-slot float32 buffer laid out like the KV pages.

Keys are read from a paged plane [num_blocks, num_kv_heads, block_size, head_size] (a strided view of the
backend's cache) through the request's block table; the accumulator is [num_blocks, num_kv_heads, block_size].
A request's window queries are consecutive in the query list; they are taken together, as one matrix of (query,
query head of the KV head's group) rows, by the programs of the first one (the others return at once). Reading
the keys twice per request, not twice per query, keeps the work memory-bound: a per-query walk would read them
twice per window query. Slots after a query's own position are masked (causal).

The slots of a request are split into ranges, as flash decoding splits them, so that a few long requests still
occupy every multiprocessor of a GPU: one program per (request, KV head, split). `_window_kernel` runs twice:
1. the statistics pass: each program walks its split with matrix products (tensor cores on a GPU) and stores
   every row's softmax maximum and normaliser over that split (online, float32);
2. the mass pass: each program combines the rows' statistics over all splits, walks its split again and adds
   each slot's probability summed over the rows. A slot belongs to one split, so the adds need no atomics.

Reference: `window_attention_mass` below (dense torch; the torch family batches the same arithmetic over pages in
`families.py`), tested against the kernels under TRITON_INTERPRET=1 with one split and with many.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A split covers at least this many slots: shorter ones would cost more in statistics than they save.
MIN_SLOTS_PER_SPLIT = 512
# Splits are chosen so that about this many programs per multiprocessor run on a GPU.
PROGRAMS_PER_MULTIPROCESSOR = 8


@triton.jit
def _window_rows(query_ptr, query_request_ptr, query_position_ptr, chunk, request, kv_head, length, num_tokens,
                 stride_q_token, stride_q_head, stride_q_dim,
                 GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, QUERY_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DIM_TILE: tl.constexpr, DOT_FLOAT32: tl.constexpr):
    """The query matrix of QUERY_TILE window queries from `chunk` on: rows (query, query head of the group), their
    validity, each row's position and index into the per-row statistics, and the end of the slots they see."""
    row = tl.arange(0, QUERY_TILE * GROUP_TILE)
    head = row % GROUP_TILE
    dims = tl.arange(0, DIM_TILE)
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
    stats_row = token * (GROUP * tl.num_programs(1)) + kv_head * GROUP + head  # (query, query head)
    return q, row_valid, position, stats_row, end


@triton.jit
def _window_kernel(
    query_ptr, key_ptr, block_table_ptr, acc_ptr, row_max_ptr, row_sum_ptr, sink_ptr,
    query_request_ptr, query_position_ptr, seq_len_ptr, num_tokens,
    stride_q_token, stride_q_head, stride_q_dim,
    stride_k_block, stride_k_head, stride_k_slot, stride_k_dim,
    stride_table_req,
    stride_acc_block, stride_acc_head, stride_acc_slot,
    scale, slots_per_split,
    GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, QUERY_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLOT_TILE: tl.constexpr, DOT_FLOAT32: tl.constexpr,
    PRECISION: tl.constexpr, MASS: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """One pass over a (request, KV head, split): the statistics pass (MASS False) stores every row's softmax
    maximum and normaliser over the split; the mass pass (MASS True) combines them over all splits (with the
    query head's sink logit where HAS_SINKS) and adds the split's slot probabilities into the accumulator."""
    first = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    request = tl.load(query_request_ptr + first)
    previous = tl.load(query_request_ptr + first - 1, mask=first > 0, other=-1)
    if previous == request:  # not the request's first window query: that one's programs do them all
        return
    length = tl.load(seq_len_ptr + request)
    table_row = block_table_ptr + request * stride_table_req
    dims = tl.arange(0, DIM_TILE)
    slots = tl.arange(0, SLOT_TILE)
    split_start = split * slots_per_split
    chunk = first
    in_request = request >= 0
    while in_request:
        q, row_valid, position, stats_row, end = _window_rows(
            query_ptr, query_request_ptr, query_position_ptr, chunk, request, kv_head, length, num_tokens,
            stride_q_token, stride_q_head, stride_q_dim, GROUP, GROUP_TILE, QUERY_TILE, HEAD_DIM, DIM_TILE,
            DOT_FLOAT32)
        stop = tl.minimum(end, split_start + slots_per_split)
        if not MASS:
            row_max = tl.full((QUERY_TILE * GROUP_TILE,), float("-inf"), tl.float32)
            row_sum = tl.zeros((QUERY_TILE * GROUP_TILE,), tl.float32)
            for start in range(split_start, stop, SLOT_TILE):
                logits = _tile_logits(q, key_ptr, table_row, kv_head, start + slots, position, length, dims,
                                      stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                                      HEAD_DIM, BLOCK_SIZE, PRECISION)
                new_max = tl.maximum(row_max, tl.max(logits, axis=1))
                # A row may see no slot of a split's first tiles (they lie after its position): its maximum stays
                # -inf.
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
                row_max = new_max
            # Splits past a row's position store (-inf, 0): they add nothing when combined.
            tl.store(row_max_ptr + stats_row * num_splits + split, row_max, mask=row_valid)
            tl.store(row_sum_ptr + stats_row * num_splits + split, row_sum, mask=row_valid)
        elif split_start < stop:
            # Each row's maximum and normaliser over all its slots, from the splits' statistics (split 0 holds
            # slot 0, which every row sees, so the maximum is finite).
            row_max = tl.full((QUERY_TILE * GROUP_TILE,), float("-inf"), tl.float32)
            for other in range(0, num_splits):
                row_max = tl.maximum(row_max, tl.load(row_max_ptr + stats_row * num_splits + other,
                                                      mask=row_valid, other=0.0))
            row_sum = tl.zeros((QUERY_TILE * GROUP_TILE,), tl.float32)
            for other in range(0, num_splits):
                part_max = tl.load(row_max_ptr + stats_row * num_splits + other, mask=row_valid, other=0.0)
                part_sum = tl.load(row_sum_ptr + stats_row * num_splits + other, mask=row_valid, other=1.0)
                row_sum += part_sum * tl.exp(part_max - row_max)
            if HAS_SINKS:
                # The sink takes its share of the normaliser; padding heads have none (-inf adds nothing).
                head = tl.arange(0, QUERY_TILE * GROUP_TILE) % GROUP_TILE
                sink = tl.load(sink_ptr + kv_head * GROUP + head, mask=head < GROUP, other=float("-inf"))
                with_sink = tl.maximum(row_max, sink.to(tl.float32))
                row_sum = row_sum * tl.exp(row_max - with_sink) + tl.exp(sink.to(tl.float32) - with_sink)
                row_max = with_sink
            for start in range(split_start, stop, SLOT_TILE):
                slot = start + slots
                logits = _tile_logits(q, key_ptr, table_row, kv_head, slot, position, length, dims,
                                      stride_k_block, stride_k_head, stride_k_slot, stride_k_dim, scale,
                                      HEAD_DIM, BLOCK_SIZE, PRECISION)
                probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
                mass = tl.sum(tl.where(row_valid[:, None], probs, 0.0), axis=0)
                in_range = slot < stop
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
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """[rows, SLOT_TILE] scaled logits of the query rows against a tile of slots (-inf past `length` and past
    each row's own position)."""
    in_range = slot < length
    block = tl.load(table_row_ptr + slot // BLOCK_SIZE, mask=in_range, other=0)
    keys = tl.load(key_ptr + block.to(tl.int64)[:, None] * stride_k_block + kv_head * stride_k_head
                   + (slot % BLOCK_SIZE)[:, None] * stride_k_slot + dims[None, :] * stride_k_dim,
                   mask=in_range[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    # Keys of an fp8 cache (or in float32 where DOT_FLOAT32 made the queries float32) take the queries' type
    keys = keys.to(q.dtype)
    logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
    visible = in_range[None, :] & (slot[None, :] <= position[:, None])
    return tl.where(visible, logits * scale, float("-inf"))


def slots_per_split(block_table: torch.Tensor, block_size: int, kv_heads: int, slot_tile: int) -> int:
    """How many slots each program covers. The longest a request can be (the block table's width; the real
    lengths stay on the device) is split only on a GPU, into ranges of at least MIN_SLOTS_PER_SPLIT, and only as
    far as it takes to give each multiprocessor PROGRAMS_PER_MULTIPROCESSOR programs. Under Triton's CPU
    interpreter programs run one after another, so there it is one split."""
    longest = block_table.shape[1] * block_size
    splits = 1
    if block_table.device.type == "cuda":
        multiprocessors = torch.cuda.get_device_properties(block_table.device).multi_processor_count
        wanted = triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, max(1, block_table.shape[0] * kv_heads))
        splits = max(1, min(wanted, longest // MIN_SLOTS_PER_SPLIT))
    return triton.cdiv(triton.cdiv(longest, splits), slot_tile) * slot_tile


def accumulate_window_attention_triton(queries: torch.Tensor, keys: torch.Tensor, block_table: torch.Tensor,
                                       accumulator: torch.Tensor, query_requests: torch.Tensor,
                                       query_positions: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                       slot_tile: int = 64, split_slots: int | None = None,
                                       sinks: torch.Tensor | None = None) -> None:
    """queries [T, q_heads, D] (window queries only, each request's consecutive); keys [blocks, kv_heads,
    block_size, D] (any float type, fp8 included; `scale` then includes the cache's key scale); block_table
    [reqs, max_blocks] int32; accumulator [blocks, kv_heads, block_size] float32 (added into); query_requests
    [T] (row of block_table), query_positions [T] (physical slot of each query), seq_lens [reqs]; sinks [q_heads]
    the attention-sink logits, or None. `split_slots` (a multiple of `slot_tile`) overrides `slots_per_split`."""
    num_tokens, q_heads, head_dim = queries.shape
    kv_heads, block_size = keys.shape[1], keys.shape[2]
    if num_tokens == 0:
        return
    group = q_heads // kv_heads
    group_tile = triton.next_power_of_2(group)
    split = split_slots or slots_per_split(block_table, block_size, kv_heads, slot_tile)
    assert split % slot_tile == 0, (split, slot_tile)
    num_splits = triton.cdiv(block_table.shape[1] * block_size, split)
    row_max = torch.empty(num_tokens, q_heads, num_splits, dtype=torch.float32, device=queries.device)
    row_sum = torch.empty_like(row_max)
    # Queries of one request per pass over its keys: all of a prefill window where they fit in 128 rows (the
    # matrix product needs at least 16).
    dot_float32 = keys.device.type == "cpu" and (torch.bfloat16 in (queries.dtype, keys.dtype)
                                                 or keys.element_size() == 1)
    query_tile = max(16 // group_tile, min(triton.next_power_of_2(num_tokens), max(1, 128 // group_tile)))
    shared = dict(
        GROUP=group, GROUP_TILE=group_tile, QUERY_TILE=query_tile, HEAD_DIM=head_dim,
        DIM_TILE=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, SLOT_TILE=slot_tile,
        # On CPU tensors the kernels run under Triton's interpreter, whose products of bfloat16 or fp8 matrices are
        # wrong or missing (numpy has neither type): there they are taken in float32. On a GPU, half precision uses
        # tensor cores, and fp8 keys are converted to the queries' type.
        DOT_FLOAT32=dot_float32,
        # float32 products exact (TF32 would round the logits)
        PRECISION="ieee" if queries.dtype == torch.float32 or dot_float32 else "tf32",
        num_warps=8 if query_tile * group_tile >= 64 else 4,
    )
    grid = (num_tokens, kv_heads, num_splits)
    arguments = (queries, keys, block_table, accumulator, row_max, row_sum,
                 row_max if sinks is None else sinks.float().contiguous(),  # no sinks: a pointer never read
                 query_requests, query_positions, seq_lens, num_tokens,
                 queries.stride(0), queries.stride(1), queries.stride(2),
                 keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3), block_table.stride(0),
                 accumulator.stride(0), accumulator.stride(1), accumulator.stride(2), scale, split)
    _window_kernel[grid](*arguments, **shared, MASS=False, HAS_SINKS=False)
    _window_kernel[grid](*arguments, **shared, MASS=True, HAS_SINKS=sinks is not None)


def window_attention_mass(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                          scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """queries [..., T, q_heads, D], keys [..., kv_heads, S, D], query_positions [..., T] (physical slot of each
    query, which attends slots 0..position) -> [..., kv_heads, S] summed probabilities; with sinks [q_heads] (the
    attention-sink logits) in each softmax's normaliser. Leading dims batch requests."""
    *batch, num_tokens, q_heads, _ = queries.shape
    kv_heads, length = keys.shape[-3], keys.shape[-2]
    group = q_heads // kv_heads
    grouped = queries.float().view(*batch, num_tokens, kv_heads, group, -1)
    logits = torch.einsum("...tkgd,...ksd->...tkgs", grouped, keys.float()) * scale
    future = torch.arange(length, device=keys.device) > query_positions[..., None]
    logits.masked_fill_(future[..., None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(kv_heads, group, 1).expand(*logits.shape[:-1], 1)
        return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1].sum(dim=(-4, -2))
    return logits.softmax(dim=-1).sum(dim=(-4, -2))
