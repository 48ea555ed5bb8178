"""The start-up self-check of the Triton kernels on a worker's device: small random pages in vLLM's GPU page view
([blocks, kv_heads, block_size, 2 * head_size], tokens-major physical order), in the cache's dtype or as fp8
bytes, both kernels against the torch references. A GPU, driver or Triton build that miscompiles them must stop
compression before any request is served, not corrupt KV silently."""

from __future__ import annotations

import torch

from infokv_vllm.kernels.families import TorchKernels, TritonKernels
from infokv_vllm.kernels.layouts import HeadMajorPageLayout, LayerQuantization

BLOCK_SIZE, HEAD_SIZE, KV_HEADS, QUERY_HEADS = 16, 64, 2, 4
LENGTHS = (37, 5, 64)  # ragged requests
KEPT = (20, 5, 33)


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


def kernel_disagreements(device: torch.device | str, dtype: torch.dtype, float8: torch.dtype | None = None,
                         seed: int = 0) -> list[str]:
    """What the Triton kernels got wrong on `device` (empty when they agree with torch): queries in `dtype`, the
    cache in `dtype` too, or, given `float8`, an fp8 cache (bytes holding `float8` values, as vLLM stores one)."""
    generator = torch.Generator().manual_seed(seed)
    table, num_blocks = shuffled_block_table(list(LENGTHS), BLOCK_SIZE, 2, generator)
    # Tokens-major storage ([blocks, block_size, kv_heads, 2 * head_size]) seen in vLLM's logical order.
    storage = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, 2 * HEAD_SIZE, generator=generator)
    storage = storage.to(dtype) if float8 is None else storage.to(float8).view(torch.uint8)
    quantization = LayerQuantization(float8)
    layout = HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE)
    keep = torch.zeros(len(LENGTHS), KV_HEADS, max(KEPT), dtype=torch.int32)
    for row, (length, kept) in enumerate(zip(LENGTHS, KEPT)):
        for head in range(KV_HEADS):
            keep[row, head, :kept] = torch.randperm(length, generator=generator)[:kept].sort().values
    n_keep = torch.tensor(KEPT, dtype=torch.int32)
    table, keep, n_keep = table.to(device), keep.to(device), n_keep.to(device)
    problems = []

    caches = [storage.to(device, copy=True).transpose(1, 2) for _ in range(2)]  # one each, never aliased
    for kernels, cache in zip((TritonKernels(), TorchKernels()), caches):
        for row in range(len(LENGTHS)):  # one request at a time, as the runner compacts
            kernels.compact_kv(cache, layout, table[row:row + 1], keep[row:row + 1], n_keep[row:row + 1])
    if not torch.equal(caches[0], caches[1]):
        problems.append("compaction moved different bytes")

    queries = torch.randn(6, QUERY_HEADS, HEAD_SIZE, generator=generator).to(dtype).to(device)
    rows = torch.tensor([0, 0, 1, 2, 2, 2], device=device)
    seq_lens = torch.tensor(LENGTHS, dtype=torch.int32, device=device)
    positions = seq_lens[rows] - torch.tensor([2, 1, 1, 3, 2, 1], device=device)
    cache = quantization.readable(storage.to(device).transpose(1, 2))
    accumulators = [torch.zeros(num_blocks, KV_HEADS, BLOCK_SIZE, device=device) for _ in range(2)]
    for kernels, accumulator in zip((TritonKernels(), TorchKernels()), accumulators):
        kernels.accumulate_window_attention(accumulator, queries, cache, layout, table, rows, positions, seq_lens,
                                            HEAD_SIZE ** -0.5)
    if not torch.allclose(accumulators[0], accumulators[1], rtol=1e-3, atol=1e-5):
        error = (accumulators[0] - accumulators[1]).abs().max().item()
        problems.append(f"window attention differs by up to {error:.3g}")
    return problems
