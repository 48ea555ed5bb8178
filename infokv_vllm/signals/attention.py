"""The attention signal: how much softmax probability the observation window's queries give each cached slot.

Probabilities are over the full kept KV of the request (causal), summed over the window's queries and over the
query heads that share each KV head, and added into a per-slot plane laid out like the KV pages.

Where the queries come from: inside each layer's attention op, the scoring attention impls
(`infokv_vllm.recording_backends`) call `record_window_queries` after vLLM's own kernel. vLLM calls attention as an opaque
custom op from its compiled graphs (and leaves it out of piecewise CUDA graphs), so this Python runs on every
call, compiled or eager. The runner opens an `ObservationWindow` only around the forward of steps whose tokens
fall in some request's window (the scheduler says where windows start); other steps do no scoring work.

When the mass is computed depends on the worker's kernel family (`kernels/families.py`):
- in the step (Triton): each layer adds its window queries' mass at once, one fused kernel per layer;
- deferred (torch): each layer only stores its window queries (`WindowQueries`), and the mass of a request's
  whole window is computed when a compaction or probe is about to read it, all of the step's scored requests
  batched in one call per layer. A decode window is one query per step, and a torch call per layer and step
  costs far more than its arithmetic; taken together, a window's queries read the request's keys once. The
  result is the same: between a window's first query and the compaction that reads it the request's KV only
  grows (any compaction of the request reads the window first), and each query still sees only the slots up to
  its own position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from infokv_vllm.signals import ATTENTION, NewBlocks, RequestPages, SignalRecorder, StepView

if TYPE_CHECKING:
    from infokv_vllm.kernels.families import KernelFamily
    from infokv_vllm.kernels.layouts import LayerQuantization, PageLayout
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


class WindowQueries:
    """The deferred mode's store: the window queries of each request, per layer, until a compaction or probe
    reads them. One buffer [layers, entries, q_heads, head_size] in the queries' dtype; a request holds one entry
    per window query from the step that computed it until its mass is computed (or it finishes). Entries are
    reused, and the buffer grows (doubling) only when more queries are held at once than ever before."""

    def __init__(self, layer_names: list[str]) -> None:
        self.layer_index = {name: index for index, name in enumerate(layer_names)}
        self.entries: dict[str, list[int]] = {}  # request id -> its queries' entries, in order
        self.positions: dict[str, list[int]] = {}  # request id -> physical position of each of its queries
        self.free: list[int] = []
        self.size = 0  # entries handed out so far; the buffer is grown to this at the next store
        self.buffer: torch.Tensor | None = None
        # layer name -> (its KV cache as the kernels read it, the scale of its logits), from its last attention op
        self.layers: dict[str, tuple[torch.Tensor, float]] = {}

    def place(self, request_id: str, positions: list[int]) -> list[int]:
        """Entries for the request's queries at `positions` (physical)."""
        if len(self.free) < len(positions):
            grown = max(2 * self.size, self.size + len(positions))
            self.free.extend(range(self.size, grown))
            self.size = grown
        entries = [self.free.pop() for _ in positions]
        self.entries.setdefault(request_id, []).extend(entries)
        self.positions.setdefault(request_id, []).extend(positions)
        return entries

    def store(self, layer_name: str, queries: torch.Tensor, entries: torch.Tensor, kv_cache: torch.Tensor,
              scale: float) -> None:
        """One layer's window queries [T, q_heads, head_size] into the `entries` [T] that `place` gave."""
        if self.buffer is None or self.buffer.shape[1] < self.size:
            grown = queries.new_zeros(len(self.layer_index), self.size, *queries.shape[1:])
            if self.buffer is not None:
                grown[:, : self.buffer.shape[1]] = self.buffer
            self.buffer = grown
        self.buffer[self.layer_index[layer_name]].index_copy_(0, entries, queries)
        self.layers[layer_name] = (kv_cache, scale)

    def take(self, request_ids: list[str]) -> list[tuple[str, list[int], list[int]]]:
        """(request id, entries, positions) of those of `request_ids` that hold queries; their entries are free
        again (to be read before the next store)."""
        taken = [(request_id, self.entries.pop(request_id), self.positions.pop(request_id))
                 for request_id in dict.fromkeys(request_ids) if request_id in self.entries]
        for _, entries, _ in taken:
            self.free.extend(entries)
        return taken

    def forget(self, request_ids: list[str]) -> None:
        self.take(request_ids)


@dataclass(frozen=True)
class ObservationWindow:
    """The current step's window: which queries score the cache, and where their mass (or, deferred, the
    queries themselves) goes."""

    query_rows: torch.Tensor  # [T] batch row of each window query
    query_tokens: torch.Tensor  # [T] index of each window query among the step's tokens
    accumulators: dict[str, torch.Tensor]  # attention layer name -> [blocks, kv_heads, block_size] float32
    quantizations: dict[str, LayerQuantization]  # attention layer name -> what its cache and queries hold
    sinks: dict[str, torch.Tensor | None]  # attention layer name -> its attention-sink logits [q_heads], or None
    layout: PageLayout
    kernels: KernelFamily
    deferred: WindowQueries | None = None  # the deferred mode's store
    stored_at: torch.Tensor | None = None  # deferred: [T] each window query's entry in the store
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


def record_window_queries(layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
                          query_start_loc: torch.Tensor, block_table: torch.Tensor, scale: float) -> None:
    """Called by a platform's attention impl after vLLM's attention of one layer: add the window queries' mass,
    or, deferred, store the queries.

    query, kv_cache and scale are what vLLM's attention impl received (an fp8 cache's bytes, fp8 queries, the
    softmax scale); seq_lens [rows] are the kept KV lengths including the step's tokens, query_start_loc [rows + 1]
    the step's token offsets, block_table [rows, blocks] this layer group's block table (the attention
    metadata's)."""
    window = _active
    if window is None or layer_name not in window.accumulators:
        return
    # The kernels read an fp8 cache as its 8-bit floats; q . (stored key * key scale) is (q . stored key) * key
    # scale, so the key scale joins the softmax scale.
    quantization = window.quantizations[layer_name]
    kv_cache, scale = quantization.readable(kv_cache), scale * quantization.key_scale
    if window.deferred is not None:
        window.deferred.store(layer_name, quantization.queries(query.index_select(0, window.query_tokens)),
                              window.stored_at, kv_cache, scale)
        return
    placed = window.placed(seq_lens, query_start_loc, kv_cache.device)
    window.kernels.accumulate_window_attention(
        window.accumulators[layer_name], quantization.queries(query[placed.tokens]), kv_cache, window.layout,
        block_table, placed.rows, placed.positions, seq_lens, scale, window.sinks[layer_name])


class AttentionRecorder(SignalRecorder):
    name = ATTENTION

    def __init__(self, storage, quantizations: dict[str, LayerQuantization],
                 sinks: dict[str, torch.Tensor | None], layout: PageLayout, kernels: KernelFamily) -> None:
        """`quantizations`: each attention layer's, by layer name, in the order of the signal planes' layers;
        `sinks`: each layer's attention-sink logits (None for a layer without)."""
        super().__init__(storage)
        layer_names = list(quantizations)
        self.accumulators = dict(zip(layer_names, storage.planes[ATTENTION]))
        self.quantizations = quantizations
        self.sinks = sinks
        self.layout = layout
        self.kernels = kernels
        self.deferred = WindowQueries(layer_names) if kernels.defers_window_attention else None
        self.window: ObservationWindow | None = None
        self._pages: Callable[[str], RequestPages] | None = None

    def forget(self, request_ids: list[str]) -> None:
        if self.deferred is not None:
            self.deferred.forget(request_ids)

    def requests_held(self) -> int:
        return len(self.deferred.entries) if self.deferred is not None else 0

    def before_step_compactions(self, plan: StepPlan, pages: Callable[[str], RequestPages]) -> None:
        self._pages = pages
        if self.deferred is not None:
            # The windows this step's compactions and probes read, while the KV is as their queries saw it.
            self._add_deferred_mass([*(compaction.request_id for compaction in plan.compactions),
                                     *(probe.request_id for probe in plan.probes)])

    def after_step_compactions(self, plan: StepPlan, blocks: NewBlocks) -> None:
        # Only now: a block the scheduler hands out this step may be one a compaction of this step freed, whose
        # accumulated attention that compaction had to read first. A prefix-cache hit shared with a running
        # request keeps that request's attention.
        self.storage.zero_blocks(ATTENTION, blocks.fresh + blocks.copied)

    def after_request_compacted(self, block_ids: list[int], probed: bool) -> None:
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
        rows, tokens, entries = [], [], []
        for row, request_id in enumerate(step.request_ids):
            start = plan.window_starts.get(request_id)
            if start is None:
                continue
            mine = torch.arange(step.query_starts[row], step.query_starts[row + 1])
            mine = mine[step.positions[mine] >= start]
            rows.append(torch.full_like(mine, row))
            tokens.append(mine)
            if self.deferred is not None and len(mine):
                physical = step.positions[mine] - self._pages(request_id).evicted
                entries.extend(self.deferred.place(request_id, physical.tolist()))
        if not (tokens and sum(map(len, tokens))):
            return
        query_tokens = torch.cat(tokens)
        stored_at = None
        if self.deferred is not None:
            device = step.slots.device
            query_tokens, stored_at = query_tokens.to(device), torch.tensor(entries, device=device)
        self.window = ObservationWindow(torch.cat(rows), query_tokens, self.accumulators, self.quantizations,
                                        self.sinks, self.layout, self.kernels, self.deferred, stored_at)

    def _add_deferred_mass(self, request_ids: list[str]) -> None:
        """Add the mass of the stored window queries of those of `request_ids` that hold some: every request's
        queries in one call per layer."""
        taken = self.deferred.take(request_ids)
        if not taken:
            return
        device = self.storage.device
        block_lists = [self._pages(request_id).block_ids for request_id, _, _ in taken]
        table = torch.zeros(len(taken), max(map(len, block_lists)), dtype=torch.int32)
        for row, block_ids in enumerate(block_lists):
            table[row, : len(block_ids)] = torch.tensor(block_ids, dtype=torch.int32)
        entries = torch.tensor([entry for _, mine, _ in taken for entry in mine], device=device)
        query_rows = torch.tensor([row for row, (_, mine, _) in enumerate(taken) for _ in mine], device=device)
        query_positions = torch.tensor([position for _, _, mine in taken for position in mine], device=device)
        seq_lens = torch.tensor([mine[-1] + 1 for _, _, mine in taken], device=device)
        table = table.to(device)
        for layer_name, index in self.deferred.layer_index.items():
            kv_cache, scale = self.deferred.layers[layer_name]
            self.kernels.accumulate_window_attention(
                self.accumulators[layer_name], self.deferred.buffer[index].index_select(0, entries), kv_cache,
                self.layout, table, query_rows, query_positions, seq_lens, scale, self.sinks[layer_name])

    def forward_context(self) -> ContextManager:
        return observation_window(self.window)
