"""vLLM's CPU attention plus the attention signal, computed with torch for the window's queries.

vLLM's CPU platform always selects its `CPU_ATTN` backend; while the worker builds the model it points that name
at this class when the policy needs attention scores (`vllm_patches.cpu_attention_backend`), so the output is
vLLM's own kernel's.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from infokv_vllm.attention.window import ObservationWindow, active_window
from infokv_vllm.scoring.attention import window_attention_mass


class ScoringCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        window = active_window()
        if window is not None and attn_metadata is not None and layer.layer_name in window.accumulators:
            accumulate_window_attention(window, layer.layer_name, query, kv_cache, attn_metadata, self.scale)
        return output


class ScoringCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[ScoringCPUAttentionImpl]:
        return ScoringCPUAttentionImpl



def accumulate_window_attention(window: ObservationWindow, layer_name: str, query: torch.Tensor,
                                kv_cache: torch.Tensor, attn_metadata, scale: float) -> None:
    accumulator = window.accumulators[layer_name]
    num_blocks, kv_heads, block_size = accumulator.shape
    pages = kv_cache.view(num_blocks, kv_heads, -1)
    starts = attn_metadata.query_start_loc
    for row, tokens in window.query_tokens.items():
        length = int(attn_metadata.seq_lens[row])
        num_queries = int(starts[row + 1] - starts[row])
        slots = torch.arange(length)
        blocks = attn_metadata.block_table[row, slots // block_size].long()
        keys = pages[blocks[:, None], :, window.key_index[slots % block_size]]  # [S, D, kv_heads]
        positions = length - num_queries + (tokens - starts[row])
        mass = window_attention_mass(query[tokens], keys.permute(2, 0, 1), positions, scale)
        accumulator[blocks, :, slots % block_size] += mass.T
