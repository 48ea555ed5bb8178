"""The kernels compression runs on a worker, as one family chosen once per worker: torch or Triton.

Each Triton kernel has a torch reference beside its test; every test runs on CPU under `TRITON_INTERPRET=1`.
The torch family serves any page layout (through `PageLayout.token_index` where the layout gives one, else on
the strided key and value planes); the Triton family needs strided planes (`PageLayout.planes`), which vLLM's
CPU pages and the CUDA backends' caches are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from infokv_vllm.kernels.compaction import compact_pages_torch, compact_plane_torch, compact_plane_triton
from infokv_vllm.kernels.window_attention import accumulate_window_attention_triton
from infokv_vllm.signals.attention import window_attention_mass

if TYPE_CHECKING:
    from infokv_vllm.core.compaction import PageLayout


class KernelFamily:
    """Compaction of KV pages and signal planes, and the window-attention accumulation."""

    name: str

    def compact_kv(self, cache: torch.Tensor, layout: PageLayout, block_table: torch.Tensor, keep: torch.Tensor,
                   n_keep: torch.Tensor) -> None:
        """Compact one layer's KV cache; block_table [reqs, blocks] int32, keep [reqs, heads, n] int32."""
        raise NotImplementedError

    def compact_signal(self, plane: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor,
                       n_keep: torch.Tensor) -> None:
        """Compact one per-slot signal plane [blocks, heads, block_size]."""
        raise NotImplementedError

    def accumulate_window_attention(self, accumulator: torch.Tensor, queries: torch.Tensor, cache: torch.Tensor,
                                    layout: PageLayout, block_table: torch.Tensor, query_rows: torch.Tensor,
                                    query_positions: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> None:
        """Add into accumulator [blocks, kv_heads, block_size] the softmax mass queries [T, q_heads, D] give each
        slot of their request (batch row `query_rows`), attending slots 0..query_positions (physical)."""
        raise NotImplementedError


class TorchKernels(KernelFamily):
    name = "torch"

    def compact_kv(self, cache, layout, block_table, keep, n_keep) -> None:
        if layout.token_index is not None:
            compact_pages_torch(layout.pages(cache), layout.token_index, block_table, keep, n_keep)
            return
        for plane in layout.planes(cache):
            compact_plane_torch(plane, block_table, keep, n_keep)

    def compact_signal(self, plane, block_table, keep, n_keep) -> None:
        compact_plane_torch(plane[..., None], block_table, keep, n_keep)

    def accumulate_window_attention(self, accumulator, queries, cache, layout, block_table, query_rows,
                                    query_positions, seq_lens, scale) -> None:
        block_size = accumulator.shape[2]
        for row in query_rows.unique().tolist():
            mine = query_rows == row
            slots = torch.arange(int(seq_lens[row]), device=accumulator.device)
            blocks = block_table[row, slots // block_size].long()
            keys = layout.gather_keys(cache, blocks, slots % block_size)  # [kv_heads, S, D]
            mass = window_attention_mass(queries[mine], keys, query_positions[mine].long(), scale)
            accumulator[blocks, :, slots % block_size] += mass.T


class TritonKernels(KernelFamily):
    name = "triton"

    def compact_kv(self, cache, layout, block_table, keep, n_keep) -> None:
        for plane in layout.planes(cache):
            compact_plane_triton(plane, block_table, keep, n_keep)

    def compact_signal(self, plane, block_table, keep, n_keep) -> None:
        compact_plane_triton(plane[..., None], block_table, keep, n_keep)

    def accumulate_window_attention(self, accumulator, queries, cache, layout, block_table, query_rows,
                                    query_positions, seq_lens, scale) -> None:
        key_plane, _ = layout.planes(cache)
        accumulate_window_attention_triton(queries, key_plane, block_table.to(torch.int32), accumulator,
                                           query_rows.to(torch.int32), query_positions.to(torch.int32),
                                           seq_lens.to(torch.int32), scale)


KERNEL_FAMILIES: dict[str, type[KernelFamily]] = {cls.name: cls for cls in (TorchKernels, TritonKernels)}


def kernel_family(name: str) -> KernelFamily:
    return KERNEL_FAMILIES[name]()
