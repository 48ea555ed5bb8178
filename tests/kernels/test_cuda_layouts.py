"""Both kernel families on the page view vLLM's CUDA backends (FLASH_ATTN, TRITON_ATTN) use, under
TRITON_INTERPRET=1 on CPU: every physical stride order vLLM offers, fp16 and bf16, several layers sharing one
buffer, ragged requests, GQA, chunked-prefill tails and decode queries, against dense torch references."""

from __future__ import annotations

import pytest
import torch

from infokv_vllm.kernels.families import TorchKernels, TritonKernels
from infokv_vllm.kernels.layouts import HeadMajorPageLayout
from infokv_vllm.kernels.selfcheck import kernel_disagreements
from infokv_vllm.kernels.selfcheck import shuffled_block_table
from tests.kernels.test_compaction import LENGTHS, check_compacted, random_keep
from tests.kernels.test_window_attention import dense_reference
from tests.kernels.vllm_pages import LAYOUTS, vllm_gpu_caches

DTYPES = [torch.float16, torch.bfloat16]
BLOCK_SIZE, HEAD_SIZE, KV_HEADS = 16, 32, 2
FAMILIES = [TritonKernels(), TorchKernels()]
# Triton's window attention also with its slots split into ranges of 64 (the longest request here spans two).
WINDOW_FAMILIES = [*FAMILIES, TritonKernels(split_slots=64)]


def family_id(kernels) -> str:
    split = getattr(kernels, "split_slots", None)
    return kernels.name + (f"-splits-of-{split}" if split else "")


def caches_and_table(layout, dtype, seed: int, lengths):
    generator = torch.Generator().manual_seed(seed)
    table, num_blocks = shuffled_block_table(lengths, BLOCK_SIZE, 3, generator)
    caches = vllm_gpu_caches(layout, 3, num_blocks, KV_HEADS, BLOCK_SIZE, HEAD_SIZE, dtype, generator)
    return caches, table, generator


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("kernels", FAMILIES, ids=family_id)
def test_compaction_on_vllm_gpu_pages(kernels, layout, dtype):
    caches, table, generator = caches_and_table(layout, dtype, 0, LENGTHS)
    keep, n_keep = random_keep(LENGTHS, KV_HEADS, generator)
    page_layout = HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE)
    before = [cache.clone() for cache in caches]
    kernels.compact_kv(caches[1], page_layout, table, keep, n_keep)
    for got, was in zip(page_layout.planes(caches[1]), page_layout.planes(before[1])):
        check_compacted(was, got, table, keep, n_keep, LENGTHS)
    # The other layers' pages share the buffer (interleaved in the block-outermost orders): untouched.
    assert torch.equal(caches[0], before[0]) and torch.equal(caches[2], before[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("q_heads", [2, 6], ids=["mha", "gqa3"])
@pytest.mark.parametrize("kernels", WINDOW_FAMILIES, ids=family_id)
def test_window_attention_on_vllm_gpu_pages(kernels, q_heads, layout, dtype):
    seq_lens = [37, 5, 70, 22]
    window = [3, 1, 8, 1]  # a chunked prefill's tail, decode queries (batched by torch), a longer window
    caches, table, generator = caches_and_table(layout, dtype, 1, seq_lens)
    rows = torch.cat([torch.full((w,), r) for r, w in enumerate(window)])
    positions = torch.cat([torch.arange(n - w, n) for n, w in zip(seq_lens, window)])
    queries = torch.randn(len(rows), q_heads, HEAD_SIZE, generator=generator).to(dtype)
    page_layout = HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE)
    keys, _ = page_layout.planes(caches[2])
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    scale = HEAD_SIZE ** -0.5
    expected = dense_reference(queries.float(), keys.float(), table, rows, positions, lengths, scale)
    accumulator = torch.zeros(keys.shape[:3])
    kernels.accumulate_window_attention(accumulator, queries, caches[2], page_layout, table, rows, positions,
                                        lengths, scale)
    torch.testing.assert_close(accumulator, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES], ids=str)
def test_start_up_self_check_passes(dtype):
    assert kernel_disagreements("cpu", dtype) == []


def test_start_up_self_check_catches_a_broken_kernel(monkeypatch):
    from infokv_vllm.kernels import families

    monkeypatch.setattr(families, "compact_plane_triton", lambda *args, **kwargs: None)
    monkeypatch.setattr(families, "accumulate_window_attention_triton", lambda *args, **kwargs: None)
    compaction, window = kernel_disagreements("cpu", torch.float16)
    assert compaction == "compaction moved different bytes"
    assert window.startswith("window attention differs by up to ")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_block_plane_reads_keys_and_values_of_vllm_gpu_pages(layout):
    caches, _, _ = caches_and_table(layout, torch.float16, 2, LENGTHS)
    page_layout, blocks = HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE), torch.tensor([2, 0, 1])
    for values in (False, True):
        columns = slice(HEAD_SIZE, None) if values else slice(None, HEAD_SIZE)
        assert torch.equal(page_layout.block_plane(caches[1], blocks, values), caches[1][blocks][..., columns])
