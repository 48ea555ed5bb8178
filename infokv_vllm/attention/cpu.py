"""vLLM's CPU attention plus the attention signal, computed with torch for the window's queries.

vLLM's CPU platform always selects its `CPU_ATTN` backend; while the worker builds the model it points that name
at this class when the policy needs attention scores (`vllm_patches.cpu_attention_backend`), so the output is
vLLM's own kernel's.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from infokv_vllm.attention.window import ObservationWindow, active_window
from infokv_vllm.kernels.window_attention import accumulate_window_attention_triton
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
    starts = attn_metadata.query_start_loc
    rows = list(window.query_tokens)
    tokens = torch.cat([window.query_tokens[row] for row in rows])
    # The queries of a request are the last tokens of its kept sequence: each attends up to its own slot.
    positions = torch.cat([
        attn_metadata.seq_lens[row] - (starts[row + 1] - starts[row]) + (window.query_tokens[row] - starts[row])
        for row in rows])
    if window.use_triton:
        requests = torch.cat([torch.full((len(window.query_tokens[row]),), row) for row in rows])
        key_plane, _ = window.layout.planes(kv_cache)
        accumulate_window_attention_triton(query[tokens], key_plane, attn_metadata.block_table.to(torch.int32),
                                           accumulator, requests.to(torch.int32), positions.to(torch.int32),
                                           attn_metadata.seq_lens.to(torch.int32), scale)
        return
    num_blocks, kv_heads, block_size = accumulator.shape
    pages = kv_cache.view(num_blocks, kv_heads, -1)
    offset = 0
    for row in rows:
        count = len(window.query_tokens[row])
        length = int(attn_metadata.seq_lens[row])
        slots = torch.arange(length)
        blocks = attn_metadata.block_table[row, slots // block_size].long()
        keys = pages[blocks[:, None], :, window.layout.key_index[slots % block_size]]  # [S, D, kv_heads]
        mass = window_attention_mass(query[tokens[offset:offset + count]], keys.permute(2, 0, 1),
                                     positions[offset:offset + count].long(), scale)
        accumulator[blocks, :, slots % block_size] += mass.T
        offset += count
