"""The compressed KV cache group's attention metadata: its requests' kept lengths, not their logical ones.

vLLM builds one `CommonAttentionMetadata` per step and hands each KV cache group a shallow copy with the group's
own block table and slot mapping; `seq_lens` is shared by all groups. A compressed request holds fewer slots than
tokens in the full-attention group only: a model's sliding-window and state (Mamba, linear-attention) groups keep
vLLM's logical lengths, which they read for window positions and state blocks. So the shift reaches the compressed
group alone: its attention groups build their metadata from a copy whose lengths are the kept ones, and the
shared tensors stay vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from vllm.v1.worker.utils import AttentionGroup


@dataclass(frozen=True)
class KeptLengths:
    """One step's shift: per batch row, the tokens its request has evicted (logical minus kept length)."""

    evicted: torch.Tensor  # [num_reqs] on the CPU, int64

    def apply(self, metadata):
        """`metadata` (a CommonAttentionMetadata, possibly padded past the batch's rows) at the kept lengths."""
        rows = metadata.seq_lens.shape[0]
        shift = torch.zeros(rows, dtype=metadata.seq_lens.dtype)
        shift[: self.evicted.shape[0]] = self.evicted[:rows].to(shift.dtype)
        upper = metadata.seq_lens_cpu_upper_bound
        if upper is not None:
            upper = upper - shift.to(upper.dtype)
        kept = metadata.seq_lens - shift.to(metadata.seq_lens.device, non_blocking=True)
        return metadata.replace(seq_lens=kept, seq_lens_cpu_upper_bound=upper,
                                max_seq_len=int(upper.max()) if upper is not None else metadata.max_seq_len,
                                _num_computed_tokens_cache=None)


class KeptLengthsAttentionGroup(AttentionGroup):
    """vLLM's attention group of the compressed KV cache group: builds its metadata at the step's kept lengths."""

    step_lengths: Callable[[], KeptLengths | None]

    def build_metadata(self, common_attn_metadata, ubatch_idx: int = 0, common_prefix_len: int = 0, **kwargs):
        lengths = self.step_lengths()
        if lengths is not None:
            common_attn_metadata = lengths.apply(common_attn_metadata)
        return super().build_metadata(common_attn_metadata, ubatch_idx, common_prefix_len, **kwargs)


def build_at_kept_lengths(attention_groups: list[AttentionGroup], step_lengths: Callable[[], KeptLengths | None]):
    """Make the compressed KV cache group's attention groups (vLLM's objects, which the runner keeps) build their
    metadata at `step_lengths()`: the current step's, or None outside a step (profiling, warm-up, graph capture)."""
    for group in attention_groups:
        group.__class__ = KeptLengthsAttentionGroup
        group.step_lengths = step_lengths
