"""KV caches laid out exactly as vLLM 0.32's GPU workers lay them out, built on CPU with vLLM's own layout code:
per layer a logical [blocks, kv_heads, block_size, 2 * head_size] view (keys first) over one byte buffer, in any
of vLLM's physical stride orders (`KVCacheLayout`, chosen with VLLM_KV_CACHE_LAYOUT)."""

from __future__ import annotations

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, compute_layer_kv_cache_shape_bytes, compute_layout_strides
from vllm.v1.kv_cache_layout import KVCacheLayout

LAYOUTS = list(KVCacheLayout)


def vllm_gpu_caches(layout: KVCacheLayout, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                    head_size: int, dtype: torch.dtype, generator: torch.Generator,
                    device: str = "cpu") -> list[torch.Tensor]:
    """One random cache view per layer, sharing one buffer as vLLM's allocation does."""
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    shape = (num_layers, *compute_layer_kv_cache_shape_bytes(spec, num_blocks))
    strides = compute_layout_strides(spec, num_blocks, num_layers, layout)
    element = torch.empty((), dtype=dtype).element_size()
    raw = torch.randn(num_layers * shape[1] * shape[2] * shape[3] * shape[4] // element,
                      generator=generator).to(dtype).view(torch.int8).to(device)
    view = torch.as_strided(raw, shape, strides)
    return [view[layer].view(dtype) for layer in range(num_layers)]
