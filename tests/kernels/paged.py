"""Random paged layouts for the kernel tests: ragged requests on shuffled blocks of one pool."""

from __future__ import annotations

import torch


def shuffled_block_table(lengths: list[int], block_size: int, spare_blocks: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """A block table [requests, max blocks] (int32) whose requests own disjoint, shuffled blocks of a pool that
    also holds `spare_blocks` owned by nobody; returns it with the pool size."""
    blocks_per_request = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_request) + spare_blocks
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.zeros(len(lengths), max(blocks_per_request), dtype=torch.int32)
    used = 0
    for req, count in enumerate(blocks_per_request):
        table[req, :count] = order[used:used + count]
        used += count
    return table, num_blocks
