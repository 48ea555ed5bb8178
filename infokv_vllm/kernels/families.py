"""The kernel families a worker runs compression on, chosen once per worker: torch or Triton.

The torch family serves any page layout (on the strided key and value planes where the layout has them, else
through `PageLayout.token_index`); the Triton family needs strided planes (`PageLayout.planes`), which vLLM's
CPU pages and the CUDA backends' caches are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infokv_vllm.kernels.compaction import (
    compact_layers_torch,
    compact_pages_torch,
    compact_plane_torch,
    compact_plane_triton,
)
from infokv_vllm.kernels.layouts import PageLayout
from infokv_vllm.kernels.window_attention import accumulate_window_attention_triton


class KernelFamily:
    """Compaction of KV pages and signal planes, and the window-attention accumulation."""

    name: str
    # Whether the attention signal stores the window queries and computes their mass only when a compaction or
    # probe reads it (`signals/attention.py`), or adds it inside each layer's attention, step by step.
    defers_window_attention: bool

    def compact_kv(self, cache: torch.Tensor, layout: PageLayout, block_table: torch.Tensor, keep: torch.Tensor,
                   n_keep: torch.Tensor) -> None:
        """Compact one layer's KV cache; block_table [reqs, blocks] int32, keep [reqs, heads, n] int32."""
        raise NotImplementedError

    def compact_signals(self, planes: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor) -> None:
        """Compact one request's slots in a signal's planes [layers, blocks, heads, block_size]; block_table
        [1, blocks] int32, keep [layers, heads, n] int32."""
        raise NotImplementedError

    def accumulate_window_attention(self, accumulator: torch.Tensor, queries: torch.Tensor, cache: torch.Tensor,
                                    layout: PageLayout, block_table: torch.Tensor, query_rows: torch.Tensor,
                                    query_positions: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                    sinks: torch.Tensor | None = None) -> None:
        """Add into accumulator [blocks, kv_heads, block_size] the softmax mass queries [T, q_heads, D] give each
        slot of their request (batch row `query_rows`), attending slots 0..query_positions (physical). `sinks`
        [q_heads]: the layer's attention-sink logits (gpt-oss), which join each softmax's normaliser and take
        their share of the mass, as in vLLM's attention."""
        raise NotImplementedError


class TorchKernels(KernelFamily):
    name = "torch"
    # A torch call costs tens of microseconds whatever its size: one call per layer for a whole window's queries,
    # not one per layer and decode step.
    defers_window_attention = True

    def __init__(self) -> None:
        # The index tensors of the last window-attention call and the row groups worked out from them
        self._last_groups: tuple[tuple[torch.Tensor, ...], list[RowGroup]] | None = None

    def compact_kv(self, cache, layout, block_table, keep, n_keep) -> None:
        if not layout.strided:
            compact_pages_torch(layout.pages(cache), layout.token_index, block_table, keep, n_keep)
            return
        # Through the planes where there are some: a slot's key or value is one run of memory there (or a few
        # regular ones), 3x faster than indexing every element of it (vLLM's CPU pages, 30 layers: 20 -> 6 ms a
        # compaction)
        for plane in layout.planes(cache):
            compact_plane_torch(plane, block_table, keep, n_keep)

    def compact_signals(self, planes, block_table, keep) -> None:
        compact_layers_torch(planes, block_table, keep)  # one op for every layer, not one per layer

    def accumulate_window_attention(self, accumulator, queries, cache, layout, block_table, query_rows,
                                    query_positions, seq_lens, scale, sinks=None) -> None:
        for group in self._row_groups(block_table, query_rows, query_positions, seq_lens, accumulator.shape[-1]):
            _accumulate_rows(accumulator, queries, cache, layout, group, scale, sinks)

    def _row_groups(self, block_table: torch.Tensor, query_rows: torch.Tensor, query_positions: torch.Tensor,
                    seq_lens: torch.Tensor, block_size: int) -> list[RowGroup]:
        """Requests with the same number of queries go through one batched op (decode steps: one query each; the
        deferred windows: a decode window each); a prompt's window, with more, goes with its own kind.

        Every layer of a step gets the same index tensors (the attention metadata's, or one deferred
        computation's), so the groups, a dozen small ops, are worked out for the first layer and kept for the
        others. They are matched by identity, not value: the kept tensors stay alive, so no new tensor can reuse
        their identity, and each step's window queries are new tensors."""
        key = (block_table, query_rows, query_positions, seq_lens)
        if self._last_groups is not None and all(kept is given for kept, given in zip(self._last_groups[0], key)):
            return self._last_groups[1]
        rows, counts = query_rows.unique_consecutive(return_counts=True)
        firsts = counts.cumsum(0) - counts
        lengths = seq_lens.to(rows.device).long()
        groups = []
        for count in counts.unique().tolist():
            mine = (counts == count).nonzero().flatten()
            query_index = firsts[mine, None] + torch.arange(count, device=firsts.device)
            width = -(-int(lengths[rows[mine]].max()) // block_size)  # blocks read, up to the longest request
            future = torch.arange(width * block_size, device=query_positions.device) > query_positions[
                query_index].view(len(mine), 1, count, 1, 1)
            groups.append(RowGroup(block_table[rows[mine], :width].long().flatten(), query_index, future))
        self._last_groups = (key, groups)
        return groups


@dataclass(frozen=True)
class RowGroup:
    """Requests whose window queries go through one batched op, as many queries each."""

    blocks: torch.Tensor  # [R * blocks] the blocks read, request by request
    query_index: torch.Tensor  # [R, T] their queries, request by request
    future: torch.Tensor  # [R, 1, T, 1, blocks * block_size]: the slots after each query's own position


def _accumulate_rows(accumulator: torch.Tensor, queries: torch.Tensor, cache: torch.Tensor, layout: PageLayout,
                     group: RowGroup, scale: float, sinks: torch.Tensor | None) -> None:
    """The window mass of one row group in one batched op. Whole blocks are read up to the longest request. Slots
    past a request's length (padding, or stale block-table entries past its blocks, which may be another
    request's) get exactly zero mass, as the queries' positions mask them, and the adds accumulate, so they change
    nothing."""
    _, kv_heads, block_size = accumulator.shape
    num_rows, num_queries = group.query_index.shape
    keys = layout.block_plane(cache, group.blocks)  # [R * blocks, kv_heads, block_size, D]
    # [R, kv_heads, D, blocks * block_size]: one matrix per request and KV head
    keys = keys.view(num_rows, -1, *keys.shape[1:]).permute(0, 2, 4, 1, 3).flatten(3, 4).float()
    head_size, length = keys.shape[-2:]
    # [R, kv_heads, T * group, D]: the rows of a query head group, query by query
    grouped = queries[group.query_index].float().view(num_rows, num_queries, kv_heads, -1, head_size).transpose(1, 2)
    logits = torch.matmul(grouped.flatten(2, 3), keys).view(num_rows, kv_heads, num_queries, -1, length)
    logits = logits.mul_(scale).masked_fill_(group.future, float("-inf"))
    if sinks is None:
        mass = logits.softmax(dim=-1).sum(dim=(2, 3))
    else:
        sink = sinks.float().to(logits.device).view(1, kv_heads, 1, -1)  # per query head: [1, kv_heads, 1, group]
        normaliser = torch.logaddexp(logits.logsumexp(dim=-1), sink)
        mass = (logits - normaliser[..., None]).exp_().sum(dim=(2, 3))
    mass = mass.view(num_rows, kv_heads, -1, block_size).transpose(1, 2).flatten(0, 1)
    accumulator.index_put_((group.blocks,), mass, accumulate=True)


class TritonKernels(KernelFamily):
    name = "triton"
    # One fused kernel per layer and step costs little on a GPU, and stored queries would take GPU memory.
    defers_window_attention = False

    def __init__(self, split_slots: int | None = None) -> None:
        self.split_slots = split_slots  # window attention's slots per program; None: `slots_per_split` decides

    def compact_kv(self, cache, layout, block_table, keep, n_keep) -> None:
        for plane in layout.planes(cache):
            compact_plane_triton(plane, block_table, keep, n_keep)

    def compact_signals(self, planes, block_table, keep) -> None:
        n_keep = torch.tensor([keep.shape[-1]], dtype=torch.int32, device=planes.device)
        for plane, layer_keep in zip(planes, keep):
            compact_plane_triton(plane[..., None], block_table, layer_keep[None], n_keep)

    def accumulate_window_attention(self, accumulator, queries, cache, layout, block_table, query_rows,
                                    query_positions, seq_lens, scale, sinks=None) -> None:
        key_plane, _ = layout.planes(cache)
        accumulate_window_attention_triton(queries, key_plane, block_table.to(torch.int32), accumulator,
                                           query_rows.to(torch.int32), query_positions.to(torch.int32),
                                           seq_lens.to(torch.int32), scale, split_slots=self.split_slots,
                                           sinks=sinks)


KERNEL_FAMILIES: dict[str, type[KernelFamily]] = {cls.name: cls for cls in (TorchKernels, TritonKernels)}


def kernel_family(name: str) -> KernelFamily:
    return KERNEL_FAMILIES[name]()
