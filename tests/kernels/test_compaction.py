"""Compaction kernel (Triton, under TRITON_INTERPRET=1 on CPU) and its torch path against a dense reference."""

from __future__ import annotations

import pytest
import torch

from infokv_vllm.kernels.compaction import compact_pages_torch, compact_plane_torch, compact_plane_triton
from infokv_vllm.kernels.families import TorchKernels
from infokv_vllm.kernels.layouts import IndexedPageLayout
from infokv_vllm.kernels.selfcheck import shuffled_block_table


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


LENGTHS = [37, 16, 100, 1, 64]


def random_keep(lengths, num_heads: int, generator: torch.Generator):
    """Per-request, per-head ascending keep lists [requests, heads, max kept] and their counts."""
    n_keep = torch.tensor([min(n, c) for n, c in zip(lengths, [20, 16, 33, 1, 64])], dtype=torch.int32)
    keep = torch.zeros(len(lengths), num_heads, int(n_keep.max()), dtype=torch.int32)
    for req, length in enumerate(lengths):
        for head in range(num_heads):
            chosen = torch.randperm(length, generator=generator)[: int(n_keep[req])].sort().values
            keep[req, head, : len(chosen)] = chosen
    return keep, n_keep


def random_paged_batch(seed: int, num_heads: int = 3, block_size: int = 16, width: int = 64):
    """Requests with ragged lengths on shuffled blocks of one pool, and per-head ascending keep lists."""
    generator = torch.Generator().manual_seed(seed)
    table, num_blocks = shuffled_block_table(LENGTHS, block_size, 5, generator)
    keep, n_keep = random_keep(LENGTHS, num_heads, generator)
    plane = torch.randn(num_blocks, num_heads, block_size, width, generator=generator)
    return plane, table, keep, n_keep, LENGTHS


def dense_tokens(plane, table, req, length):
    """[heads, length, width]: the request's tokens in logical order, read through its block table."""
    block_size = plane.shape[2]
    index = torch.arange(length)
    return plane[table[req, index // block_size].long(), :, index % block_size].transpose(0, 1)


def check_compacted(before, after, table, keep, n_keep, lengths):
    owned = set()
    for req, length in enumerate(lengths):
        count = int(n_keep[req])
        expected = torch.stack([dense_tokens(before, table, req, length)[h, keep[req, h, :count].long()]
                                for h in range(before.shape[1])])
        torch.testing.assert_close(dense_tokens(after, table, req, count), expected, rtol=0, atol=0)
        owned.update(table[req, : -(-length // before.shape[2])].tolist())
    for block in set(range(before.shape[0])) - owned:
        assert torch.equal(after[block], before[block]), f"block {block} of no request was written"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("compact", [compact_plane_triton, compact_plane_torch], ids=["triton", "torch"])
def test_compaction_matches_dense_reference(seed, compact):
    plane, table, keep, n_keep, lengths = random_paged_batch(seed)
    before = plane.clone()
    plane, table, keep, n_keep = (t.to(DEVICE) for t in (plane, table, keep, n_keep))
    compact(plane, table, keep, n_keep)
    check_compacted(before, plane.cpu(), table.cpu(), keep.cpu(), n_keep.cpu(), lengths)


def test_triton_on_strided_key_and_value_planes_of_one_cache():
    """Keys and values as two strided views of one cache [blocks, heads, 2 * block_size, dim]."""
    plane, table, keep, n_keep, lengths = random_paged_batch(3, width=32)
    cache = torch.cat([plane, plane.flip(-1) + 1], dim=2).to(DEVICE)
    block_size = plane.shape[2]
    keys, values = cache[:, :, :block_size], cache[:, :, block_size:]
    before_keys, before_values = keys.cpu().clone(), values.cpu().clone()
    table, keep, n_keep = table.to(DEVICE), keep.to(DEVICE), n_keep.to(DEVICE)
    compact_plane_triton(keys, table, keep, n_keep)
    compact_plane_triton(values, table, keep, n_keep)
    check_compacted(before_keys, keys.cpu(), table.cpu(), keep.cpu(), n_keep.cpu(), lengths)
    check_compacted(before_values, values.cpu(), table.cpu(), keep.cpu(), n_keep.cpu(), lengths)


def test_torch_on_vllm_cpu_pages_with_column_major_keys():
    """vLLM's CPU attention page: keys column-major [dim, block_size], then values row-major [block_size, dim]."""
    keys, table, keep, n_keep, lengths = random_paged_batch(5, width=32)
    values = keys.flip(-1) + 1
    num_blocks, num_heads, block_size, dim = keys.shape
    pages = torch.cat([keys.transpose(2, 3).reshape(num_blocks, num_heads, -1),
                       values.reshape(num_blocks, num_heads, -1)], dim=2)
    slot, column = torch.arange(block_size)[:, None], torch.arange(dim)[None, :]
    token_index = torch.cat([column * block_size + slot, block_size * dim + slot * dim + column], dim=1)
    compact_pages_torch(pages, token_index, table, keep, n_keep)
    after_keys = pages[..., : block_size * dim].view(num_blocks, num_heads, dim, block_size).transpose(2, 3)
    after_values = pages[..., block_size * dim:].view(num_blocks, num_heads, block_size, dim)
    check_compacted(keys, after_keys, table, keep, n_keep, lengths)
    check_compacted(values, after_values, table, keep, n_keep, lengths)


@pytest.mark.parametrize("keys_strided", [True, False], ids=["planes", "element-index"])
def test_torch_family_on_vllm_cpu_pages(keys_strided):
    """The family moves vLLM's CPU pages through their strided key and value planes, and a layout that has none
    (keys stored in a shuffled slot order) element by element."""
    keys, table, keep, n_keep, lengths = random_paged_batch(6, width=32)
    values = keys.flip(-1) + 1
    num_blocks, num_heads, block_size, dim = keys.shape
    order = torch.arange(block_size) if keys_strided else torch.randperm(
        block_size, generator=torch.Generator().manual_seed(2))
    column_of = order.argsort()  # the column of the key block that holds each slot
    pages = torch.cat([keys[:, :, order].transpose(2, 3).reshape(num_blocks, num_heads, -1),
                       values.reshape(num_blocks, num_heads, -1)], dim=2)
    slot, column = torch.arange(block_size)[:, None], torch.arange(dim)[None, :]
    layout = IndexedPageLayout(torch.cat([column * block_size + column_of[:, None],
                                          block_size * dim + slot * dim + column], dim=1))
    assert layout.strided == keys_strided
    TorchKernels().compact_kv(pages, layout, table, keep, n_keep)
    after_keys = pages[..., : block_size * dim].view(num_blocks, num_heads, dim, block_size)[..., column_of]
    after_values = pages[..., block_size * dim:].view(num_blocks, num_heads, block_size, dim)
    check_compacted(keys, after_keys.transpose(2, 3), table, keep, n_keep, lengths)
    check_compacted(values, after_values, table, keep, n_keep, lengths)


@pytest.mark.parametrize("compact", [compact_plane_triton, compact_plane_torch], ids=["triton", "torch"])
def test_side_data_of_width_one_moves_with_tokens(compact):
    plane, table, keep, n_keep, lengths = random_paged_batch(4, width=1)
    before = plane.clone()
    compact(plane, table, keep, n_keep)
    check_compacted(before, plane, table, keep, n_keep, lengths)
