"""fp8 KV caches (bytes holding 8-bit floats, per-tensor scales) for the kernels and their readers, under
TRITON_INTERPRET=1 on CPU: compaction moves the bytes on every page layout the kernels serve, the window attention
reads them dequantised, the self-check accepts fp8 and catches a broken kernel on it, and the CPU page probe maps
vLLM's own fp8 pages, read back dequantised, against float references."""

from __future__ import annotations

import math

import pytest
import torch

from infokv_vllm.core.paged_compactor import PagedKVCompactor
from infokv_vllm.kernels.families import TorchKernels, TritonKernels
from infokv_vllm.kernels.layouts import HeadMajorPageLayout, LayerQuantization
from infokv_vllm.kernels.selfcheck import kernel_disagreements, shuffled_block_table
from infokv_vllm.platforms.cpu import CPU_FLOAT8_FORMATS, probe_cpu_page_layout, probe_marks
from tests.kernels.test_compaction import LENGTHS, check_compacted, random_keep
from tests.kernels.test_window_attention import dense_reference
from tests.kernels.vllm_pages import LAYOUTS

BLOCK_SIZE, HEAD_SIZE, KV_HEADS = 16, 32, 2
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FAMILIES = [TritonKernels(), TorchKernels()]


def fp8_gpu_cache(layout, float8, seed: int, lengths):
    """One layer's cache in vLLM's GPU page view and stride order `layout`, as fp8 bytes (uint8), and its values."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, compute_layer_kv_cache_shape_bytes, compute_layout_strides

    generator = torch.Generator().manual_seed(seed)
    table, num_blocks = shuffled_block_table(lengths, BLOCK_SIZE, 3, generator)
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.uint8)
    shape = (1, *compute_layer_kv_cache_shape_bytes(spec, num_blocks))
    raw = torch.randn(math.prod(shape), generator=generator).to(float8).view(torch.uint8)
    cache = torch.as_strided(raw, shape, compute_layout_strides(spec, num_blocks, 1, layout))[0]
    return cache, table, generator


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("kernels", FAMILIES, ids=lambda kernels: kernels.name)
def test_compaction_moves_fp8_bytes_on_vllm_gpu_pages(kernels, layout):
    cache, table, generator = fp8_gpu_cache(layout, torch.float8_e4m3fn, 0, LENGTHS)
    keep, n_keep = random_keep(LENGTHS, KV_HEADS, generator)
    page_layout = HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE)
    before = cache.clone()
    kernels.compact_kv(cache, page_layout, table, keep, n_keep)
    for got, was in zip(page_layout.planes(cache), page_layout.planes(before)):
        check_compacted(was, got, table, keep, n_keep, LENGTHS)


@pytest.mark.parametrize("float8", FLOAT8, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("kernels", FAMILIES, ids=lambda kernels: kernels.name)
def test_window_attention_reads_fp8_keys_dequantised(kernels, layout, float8):
    """Through the kernels as the attention signal calls them (`readable` cache, key scale in the logits' scale):
    the mass of float32 keys equal to stored value times scale."""
    seq_lens, window = [37, 5, 22], [3, 1, 1]
    cache, table, generator = fp8_gpu_cache(layout, float8, 1, seq_lens)
    quantization = LayerQuantization(float8, key_scale=0.37, value_scale=2.0)
    rows = torch.cat([torch.full((w,), r) for r, w in enumerate(window)])
    positions = torch.cat([torch.arange(n - w, n) for n, w in zip(seq_lens, window)])
    queries = torch.randn(len(rows), 6, HEAD_SIZE, generator=generator).to(torch.bfloat16)
    page_layout = HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE)
    keys = page_layout.planes(quantization.readable(cache))[0].float() * quantization.key_scale
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    scale = HEAD_SIZE ** -0.5
    expected = dense_reference(queries.float(), keys, table, rows, positions, lengths, scale)
    accumulator = torch.zeros(keys.shape[:3])
    kernels.accumulate_window_attention(accumulator, queries, quantization.readable(cache), page_layout, table, rows,
                                        positions, lengths, scale * quantization.key_scale)
    torch.testing.assert_close(accumulator, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("float8", FLOAT8, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_start_up_self_check_passes_on_fp8(dtype, float8):
    assert kernel_disagreements("cpu", dtype, float8) == []


def test_start_up_self_check_catches_a_kernel_broken_on_fp8(monkeypatch):
    from infokv_vllm.kernels import families

    monkeypatch.setattr(families, "compact_plane_triton", lambda *args, **kwargs: None)
    monkeypatch.setattr(families, "accumulate_window_attention_triton", lambda *args, **kwargs: None)
    compaction, window = kernel_disagreements("cpu", torch.bfloat16, torch.float8_e4m3fn)
    assert compaction == "compaction moved different bytes"
    assert window.startswith("window attention differs by up to ")


def test_queries_vllm_quantized_are_dequantised_per_kv_head_group():
    scales = torch.tensor([0.5, 4.0])
    stored = torch.randn(3, 6, 8).to(torch.float8_e4m3fn)
    got = LayerQuantization(torch.float8_e4m3fn, query_scales=scales).queries(stored)
    expected = stored.float() * scales.repeat_interleave(3)[None, :, None]
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    plain = torch.randn(3, 6, 8)
    assert LayerQuantization(torch.float8_e4m3fn).queries(plain) is plain


@pytest.mark.parametrize("cache_dtype", ["auto", *CPU_FLOAT8_FORMATS])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_probe_maps_pages_vllm_writes_and_reads_them_dequantised(model_dtype, cache_dtype):
    """Keys and values written through vLLM's CPU cache-write op with per-tensor scales, read back through the
    probed layout by `PagedKVCompactor.read`, are the keys and values written (chosen so that fp8 holds them
    exactly: stored value times a power-of-two scale)."""
    import vllm._custom_ops as ops

    float8 = CPU_FLOAT8_FORMATS.get(cache_dtype)
    block_size, head_size, blocks, length = 32, 64, 3, 70
    layout = probe_cpu_page_layout(model_dtype, block_size, head_size, "vec", cache_dtype)
    quantization = LayerQuantization(float8, key_scale=0.5, value_scale=4.0) if float8 else LayerQuantization()
    generator = torch.Generator().manual_seed(0)
    marks = probe_marks(float8)
    stored = marks[torch.randint(len(marks), (2, length, KV_HEADS, head_size), generator=generator)]
    keys, values = (stored[0] * quantization.key_scale).to(model_dtype), (stored[1] * quantization.value_scale).to(
        model_dtype)
    cache = torch.zeros(blocks, KV_HEADS, block_size, 2 * head_size, dtype=torch.uint8 if float8 else model_dtype)
    key_cache, value_cache = cache.view(blocks, KV_HEADS, 2 * block_size, head_size).chunk(2, dim=2)
    block_ids = [2, 0, 1]
    slots = torch.tensor([block_ids[i // block_size] * block_size + i % block_size for i in range(length)])
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "vec",
                                   quantization.key_scale, quantization.value_scale, cache_dtype)
    compactor = PagedKVCompactor([cache], [quantization], layout, KV_HEADS, TorchKernels())
    for written, read in ((keys, compactor.read(block_ids, length)),
                          (values, compactor.read(block_ids, length, values=True))):
        assert torch.equal(read[0].float(), written.transpose(0, 1).float())
