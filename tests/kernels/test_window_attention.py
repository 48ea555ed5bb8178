"""Window attention accumulation (Triton, under TRITON_INTERPRET=1 on CPU) against the dense torch reference."""

from __future__ import annotations

import pytest
import torch

from infokv_vllm.kernels.families import TorchKernels
from infokv_vllm.kernels.layouts import HeadMajorPageLayout, IndexedPageLayout
from infokv_vllm.kernels.selfcheck import shuffled_block_table
from infokv_vllm.kernels.window_attention import accumulate_window_attention_triton, window_attention_mass

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_case(seed: int, q_heads: int, kv_heads: int, head_dim: int = 32, block_size: int = 16):
    """Ragged requests on shuffled blocks; some queries decode (last slot), some are a prefill chunk's tail or a
    stored decode window. The torch family batches the requests with as many queries as each other (three with
    one, two with three)."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [37, 5, 70, 22, 1, 9]
    window = [3, 1, 8, 1, 1, 3]  # window queries per request, the last ones of the sequence
    table, num_blocks = shuffled_block_table(seq_lens, block_size, 3, generator)
    keys = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator)
    requests = torch.cat([torch.full((w,), r) for r, w in enumerate(window)]).int()
    positions = torch.cat([torch.arange(n - w, n) for n, w in zip(seq_lens, window)]).int()
    queries = torch.randn(len(requests), q_heads, head_dim, generator=generator)
    return queries, keys, table, requests, positions, torch.tensor(seq_lens, dtype=torch.int32)


def dense_reference(queries, keys, table, requests, positions, seq_lens, scale, sinks=None):
    block_size = keys.shape[2]
    accumulator = torch.zeros(keys.shape[:3])
    for req in range(len(seq_lens)):
        rows = (requests == req).nonzero().flatten()
        slots = torch.arange(int(seq_lens[req]))
        blocks = table[req, slots // block_size].long()
        dense_keys = keys[blocks, :, slots % block_size].transpose(0, 1)  # [kv_heads, S, D]
        mass = window_attention_mass(queries[rows], dense_keys, positions[rows].long(), scale, sinks)
        accumulator[blocks, :, slots % block_size] += mass.T
    return accumulator


@pytest.mark.parametrize("split_slots", [None, 32, 16], ids=["one-split", "splits-of-32", "splits-of-16"])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(9, 3), (4, 4), (8, 1)], ids=["gqa3", "mha", "mqa"])
def test_matches_dense_reference(q_heads, kv_heads, split_slots):
    """With the slots split into ranges (some of them wholly after a query's position, some after every slot
    of a request), the statistics combine to the same mass as one pass."""
    case = paged_case(0, q_heads, kv_heads)
    scale = 32 ** -0.5
    expected = dense_reference(*case, scale)
    queries, keys, table, requests, positions, seq_lens = (t.to(DEVICE) for t in case)
    accumulator = torch.zeros(keys.shape[:3], device=DEVICE)
    accumulate_window_attention_triton(queries, keys, table, accumulator, requests, positions, seq_lens, scale,
                                       slot_tile=16, split_slots=split_slots)
    torch.testing.assert_close(accumulator.cpu(), expected, rtol=1e-4, atol=1e-6)


def test_sinks_take_their_share_of_each_softmax():
    """With attention-sink logits (gpt-oss), each query head's probabilities over the slots sum to what the sink
    leaves: sum(exp(logits)) / (sum(exp(logits)) + exp(sink)); without, to 1."""
    generator = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(3, 4, 8, generator=generator), torch.randn(2, 6, 8, generator=generator)
    positions, sinks = torch.tensor([3, 4, 5]), torch.tensor([0.5, -1.0, 2.0, 0.0])
    logits = torch.einsum("tkgd,ksd->tkgs", queries.view(3, 2, 2, 8), keys) * 0.3
    logits.masked_fill_(torch.arange(6) > positions[:, None, None, None], float("-inf"))
    kept = logits.exp().sum(-1)  # [T, kv_heads, group]
    share = kept / (kept + sinks.view(2, 2).exp())
    mass = window_attention_mass(queries, keys, positions, 0.3, sinks)
    torch.testing.assert_close(mass.sum(-1), share.sum(dim=(0, 2)))
    torch.testing.assert_close(window_attention_mass(queries, keys, positions, 0.3).sum(-1),
                               torch.full((2,), 3 * 2.0))


@pytest.mark.parametrize("split_slots", [None, 16], ids=["one-split", "splits-of-16"])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(6, 2), (3, 3)], ids=["gqa3", "mha"])
def test_sinks_match_dense_reference(q_heads, kv_heads, split_slots):
    """The Triton kernel and the torch family add the sink to each row's normaliser as the reference does."""
    case = paged_case(6, q_heads, kv_heads)
    sinks = torch.linspace(-2.0, 3.0, q_heads)
    expected = dense_reference(*case, 0.25, sinks)
    assert not torch.allclose(expected, dense_reference(*case, 0.25))
    queries, keys, table, requests, positions, seq_lens = case
    accumulator = torch.zeros(keys.shape[:3])
    accumulate_window_attention_triton(queries, keys, table, accumulator, requests, positions, seq_lens, 0.25,
                                       slot_tile=16, split_slots=split_slots, sinks=sinks)
    torch.testing.assert_close(accumulator, expected, rtol=1e-4, atol=1e-6)
    layout = HeadMajorPageLayout(keys.shape[2], keys.shape[3])
    pages = torch.cat([keys, torch.zeros_like(keys)], dim=-1)
    accumulator = torch.zeros(keys.shape[:3])
    TorchKernels().accumulate_window_attention(accumulator, queries, pages, layout, table, requests, positions,
                                               seq_lens, 0.25, sinks)
    torch.testing.assert_close(accumulator, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("split_slots", [None, 64], ids=["one-split", "splits"])
def test_window_longer_than_one_query_tile(split_slots):
    """A prefill window of 80 queries with 4 query heads per KV head: 128 matrix rows hold 32 of them, so the
    request's programs take its queries in three tiles (the last one partly padding), beside decode rows; the
    window's first queries see none of the last split's slots."""
    generator = torch.Generator().manual_seed(4)
    seq_lens, window = [100, 9, 33], [80, 1, 1]
    table, num_blocks = shuffled_block_table(seq_lens, 16, 2, generator)
    keys = torch.randn(num_blocks, 2, 16, 32, generator=generator)
    requests = torch.cat([torch.full((w,), r) for r, w in enumerate(window)]).int()
    positions = torch.cat([torch.arange(n - w, n) for n, w in zip(seq_lens, window)]).int()
    queries = torch.randn(len(requests), 8, 32, generator=generator)
    case = (queries, keys, table, requests, positions, torch.tensor(seq_lens, dtype=torch.int32))
    expected = dense_reference(*case, 0.25)
    accumulator = torch.zeros(keys.shape[:3])
    accumulate_window_attention_triton(*case[:3], accumulator, *case[3:], 0.25, split_slots=split_slots)
    torch.testing.assert_close(accumulator, expected, rtol=1e-4, atol=1e-6)


def test_adds_to_what_is_there_and_reads_strided_keys():
    queries, keys, table, requests, positions, seq_lens = paged_case(1, 6, 2)
    scale = 0.2
    # keys as the key half of a vLLM-GPU-style [blocks, 2, block_size, heads, dim] cache, permuted to a plane
    cache = torch.stack([keys.permute(0, 2, 1, 3), torch.zeros_like(keys.permute(0, 2, 1, 3))], dim=1)
    key_plane = cache[:, 0].permute(0, 2, 1, 3)
    previous = torch.rand(keys.shape[:3])
    accumulator = previous.clone()
    accumulate_window_attention_triton(queries, key_plane, table, accumulator, requests, positions, seq_lens,
                                       scale)
    expected = previous + dense_reference(queries, keys, table, requests, positions, seq_lens, scale)
    torch.testing.assert_close(accumulator, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("keys_strided", "values_strided"), [(True, True), (False, False), (True, False)],
                         ids=["strided", "not-strided", "values-not-strided"])
def test_torch_family_on_vllm_cpu_pages(keys_strided, values_strided):
    """vLLM's CPU attention page (keys column-major [dim, block_size], then values), read through the page
    layout: the torch family's path on CPU, decode rows batched across requests. Keys that are no strided view
    (slots stored in a shuffled order) are read through the element index instead; values laid out any way do
    not stop strided keys from being read as a plane."""
    queries, keys, table, requests, positions, seq_lens = paged_case(2, 6, 2)
    num_blocks, num_heads, block_size, dim = keys.shape
    shuffled = torch.randperm(block_size, generator=torch.Generator().manual_seed(3))
    key_order = torch.arange(block_size) if keys_strided else shuffled
    value_slot = (torch.arange(block_size) if values_strided else shuffled)[:, None]
    pages = torch.cat([keys[:, :, key_order].transpose(2, 3).reshape(num_blocks, num_heads, -1),
                       torch.randn(num_blocks, num_heads, block_size * dim)], dim=2)
    key_slot, column = key_order.argsort()[:, None], torch.arange(dim)[None, :]
    layout = IndexedPageLayout(torch.cat([column * block_size + key_slot,
                                          block_size * dim + value_slot * dim + column], 1))
    assert [strides is not None for strides in layout._strides] == [keys_strided, values_strided]
    previous = torch.rand(keys.shape[:3])
    accumulator = previous.clone()
    TorchKernels().accumulate_window_attention(accumulator, queries, pages, layout, table, requests, positions,
                                               seq_lens, 0.3)
    expected = previous + dense_reference(queries, keys, table, requests, positions, seq_lens, 0.3)
    torch.testing.assert_close(accumulator, expected, rtol=1e-4, atol=1e-6)


def test_torch_family_keeps_its_row_groups_for_the_same_index_tensors_only():
    """Layers of one step share the index tensors, so their row groups are worked out once. The next step's
    queries are new tensors even where vLLM's metadata buffers (block table, lengths) are the same ones, changed in
    place: the row groups are worked out again."""
    kernels = TorchKernels()
    queries, keys, table, requests, positions, seq_lens = paged_case(5, 4, 2)
    layout = HeadMajorPageLayout(keys.shape[2], keys.shape[3])
    for step in range(2):
        if step == 1:
            seq_lens[2] = 40  # request 2 is shorter now (compacted): its window's positions move down
            requests, positions = requests.clone(), positions.clone()
            positions[4:12] = torch.arange(32, 40)
        for layer in range(2):  # other keys and queries, the same index tensors
            layer_keys, layer_queries = keys + layer, queries * (layer + 1)
            accumulator = torch.zeros(keys.shape[:3])
            kernels.accumulate_window_attention(accumulator, layer_queries,
                                                torch.cat([layer_keys, torch.zeros_like(layer_keys)], -1), layout,
                                                table, requests, positions, seq_lens, 0.3)
            expected = dense_reference(layer_queries, layer_keys, table, requests, positions, seq_lens, 0.3)
            torch.testing.assert_close(accumulator, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("keys_strided", "values_strided"), [(True, True), (False, False), (True, False)],
                         ids=["strided", "not-strided", "values-not-strided"])
def test_block_plane_reads_keys_and_values_of_vllm_cpu_pages(keys_strided, values_strided):
    """What policies that read the cache get (R-KV's keys, the value-norm term's values): each slot's own key
    and value, through the plane where the layout is strided and through the element index where it is not."""
    generator = torch.Generator().manual_seed(4)
    num_blocks, num_heads, block_size, dim = 5, 2, 16, 8
    keys, values = (torch.randn(num_blocks, num_heads, block_size, dim, generator=generator) for _ in range(2))
    shuffled = torch.randperm(block_size, generator=generator)
    key_order = torch.arange(block_size) if keys_strided else shuffled
    value_order = torch.arange(block_size) if values_strided else shuffled
    # slot s: its key in column key_order.argsort()[s] of the column-major key block, its value in row
    # value_order.argsort()[s] of the row-major value block (the index below says the same)
    pages = torch.cat([keys[:, :, key_order].transpose(2, 3).reshape(num_blocks, num_heads, -1),
                       values[:, :, value_order].reshape(num_blocks, num_heads, -1)], dim=2)
    column = torch.arange(dim)[None, :]
    layout = IndexedPageLayout(torch.cat([column * block_size + key_order.argsort()[:, None],
                                          block_size * dim + value_order.argsort()[:, None] * dim + column], 1))
    assert [strides is not None for strides in layout._strides] == [keys_strided, values_strided]
    blocks = torch.tensor([3, 0, 4])
    assert torch.equal(layout.block_plane(pages, blocks), keys[blocks])
    assert torch.equal(layout.block_plane(pages, blocks, values=True), values[blocks])
