"""The attention signal: how much softmax probability the observation window's queries give each cached slot.

Probabilities are over the full kept KV of the request (causal), summed over the window's queries and over the
query heads that share each KV head, and added into a per-slot plane laid out like the KV pages.

Where it is recorded: inside each layer's attention op, by the scoring attention impls (`infokv_vllm.attention`),
which call `accumulate_in_attention` after vLLM's own kernel. vLLM calls attention as an opaque custom op from
its compiled graphs (and leaves it out of piecewise CUDA graphs), so this Python runs on every call, compiled or
eager. The runner opens an `ObservationWindow` only around the forward of steps whose tokens fall in some
request's window (the scheduler says where windows start); other steps do no scoring work. The mass itself is
computed by the worker's kernel family (`kernels/families.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ContextManager

import torch

from infokv_vllm.signals import ATTENTION, NewBlocks, SignalRecorder, StepView

if TYPE_CHECKING:
    from infokv_vllm.kernels.families import KernelFamily
    from infokv_vllm.kernels.layouts import PageLayout
    from infokv_vllm.messages import StepPlan


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool along the sequence (last dim), same length: a kept token keeps its neighbours' context."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    pooled = torch.nn.functional.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1,
                                            padding=kernel // 2)
    return pooled.reshape(shape)


@dataclass(frozen=True)
class PlacedQueries:
    tokens: torch.Tensor  # [T] index among the step's tokens
    rows: torch.Tensor  # [T] batch row
    positions: torch.Tensor  # [T] position in the request's kept sequence


@dataclass(frozen=True)
class ObservationWindow:
    """The current step's window: which queries score the cache, and where the mass accumulates."""

    query_rows: torch.Tensor  # [T] batch row of each window query
    query_tokens: torch.Tensor  # [T] index of each window query among the step's tokens
    accumulators: dict[str, torch.Tensor]  # attention layer name -> [blocks, kv_heads, block_size] float32
    layout: PageLayout
    kernels: KernelFamily
    # (seq_lens, query_start_loc, placed queries) per attention metadata seen this step
    _placements: list[tuple[torch.Tensor, torch.Tensor, PlacedQueries]] = field(default_factory=list)

    def placed(self, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, device: torch.device) -> PlacedQueries:
        """Where the window queries sit in this step's batch. Every layer of a KV cache group gets the same
        metadata tensors, so this is computed once per step and group, not once per layer (ten small ops: 20 us
        on a 2-core CPU, 0.6 ms a step over 30 layers)."""
        for lens, starts, placed in self._placements:
            if lens is seq_lens and starts is query_start_loc:
                return placed
        rows, tokens = self.query_rows, self.query_tokens
        starts_here = query_start_loc.to(rows.device)
        lengths = seq_lens.to(rows.device)
        # The queries of a request are the last tokens of its kept sequence: each attends up to its own slot.
        positions = lengths[rows] - (starts_here[rows + 1] - starts_here[rows]) + (tokens - starts_here[rows])
        placed = PlacedQueries(tokens.to(device), rows.to(device), positions.to(device))
        self._placements.append((seq_lens, query_start_loc, placed))
        return placed


_active: ObservationWindow | None = None


@contextlib.contextmanager
def observation_window(window: ObservationWindow | None) -> Iterator[None]:
    global _active
    _active = window
    try:
        yield
    finally:
        _active = None


def accumulate_in_attention(layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, block_table: torch.Tensor, scale: float) -> None:
    """Called by a platform's attention impl after vLLM's attention of one layer: add the window queries' mass.

    seq_lens [rows] are the kept KV lengths including the step's tokens, query_start_loc [rows + 1] the step's
    token offsets, block_table [rows, blocks] this layer group's block table (the attention metadata's)."""
    window = _active
    if window is None or layer_name not in window.accumulators:
        return
    placed = window.placed(seq_lens, query_start_loc, kv_cache.device)
    window.kernels.accumulate_window_attention(
        window.accumulators[layer_name], query[placed.tokens], kv_cache, window.layout, block_table, placed.rows,
        placed.positions, seq_lens, scale)


class AttentionRecorder(SignalRecorder):
    name = ATTENTION

    def __init__(self, storage, layer_names: list[str], layout: PageLayout, kernels: KernelFamily) -> None:
        super().__init__(storage)
        self.accumulators = dict(zip(layer_names, storage.planes[ATTENTION]))
        self.layout = layout
        self.kernels = kernels
        self.window: ObservationWindow | None = None

    def after_compactions(self, plan: StepPlan, blocks: NewBlocks) -> None:
        # Only now: a block the scheduler hands out this step may be one a compaction of this step freed, whose
        # accumulated attention that compaction had to read first. A prefix-cache hit shared with a running
        # request keeps that request's attention.
        self.storage.zero_blocks(ATTENTION, blocks.fresh + blocks.copied)

    def after_compaction(self, block_ids: list[int], probed: bool) -> None:
        if not probed:
            # The next observation window starts afresh. (A probe started it already; what that window has
            # accumulated since moved with its slots.)
            self.storage.zero_blocks(ATTENTION, block_ids)

    def after_probe(self, block_ids: list[int]) -> None:
        self.storage.zero_blocks(ATTENTION, block_ids)  # the probe read this window; the next one starts afresh

    def before_forward(self, plan: StepPlan, step: StepView) -> None:
        self.window = None
        if not plan.window_starts:
            return
        rows, tokens = [], []
        for row, request_id in enumerate(step.request_ids):
            start = plan.window_starts.get(request_id)
            if start is None:
                continue
            mine = torch.arange(step.query_starts[row], step.query_starts[row + 1])
            mine = mine[step.positions[mine] >= start]
            rows.append(torch.full_like(mine, row))
            tokens.append(mine)
        if tokens and sum(map(len, tokens)):
            self.window = ObservationWindow(torch.cat(rows), torch.cat(tokens), self.accumulators, self.layout,
                                            self.kernels)

    def forward_context(self) -> ContextManager:
        return observation_window(self.window)
