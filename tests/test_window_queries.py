"""The attention signal's deferred mode (torch kernels): window queries stored step by step, their mass computed
when a compaction or probe reads it, must equal the mass added in each step, whatever the batch does meanwhile.

The steps are driven the way the model runner drives the recorder (plan, then the step's view, then each layer's
attention op inside the forward context), on vLLM's CPU page layout; the reference is the same recorder adding
the mass inside each layer's attention."""

from __future__ import annotations

import torch

from infokv_vllm.kernels.families import TorchKernels
from infokv_vllm.kernels.layouts import IndexedPageLayout
from infokv_vllm.messages import Compaction, Probe, StepPlan
from infokv_vllm.signals import ATTENTION, RequestPages, StepView
from infokv_vllm.signals.attention import AttentionRecorder, record_window_queries
from infokv_vllm.signals.storage import SlotSignals

LAYERS, BLOCKS, KV_HEADS, Q_HEADS, HEAD_SIZE, BLOCK_SIZE = ["a", "b"], 24, 2, 6, 8, 4
SCALE = HEAD_SIZE ** -0.5


class InStepTorchKernels(TorchKernels):
    defers_window_attention = False


def cpu_layout() -> IndexedPageLayout:
    """vLLM's CPU pages: keys column-major, then values row-major."""
    column, slot = torch.arange(HEAD_SIZE)[None, :], torch.arange(BLOCK_SIZE)[:, None]
    return IndexedPageLayout(torch.cat([column * BLOCK_SIZE + slot,
                                        BLOCK_SIZE * HEAD_SIZE + slot * HEAD_SIZE + column], 1))


class Batch:
    """Requests on their pages, a KV cache per layer, and the recorder under test."""

    def __init__(self, kernels, blocks: dict[str, list[int]], evicted: dict[str, int]) -> None:
        generator = torch.Generator().manual_seed(0)
        self.caches = {name: torch.randn(BLOCKS, KV_HEADS, 2 * BLOCK_SIZE * HEAD_SIZE, generator=generator)
                       for name in LAYERS}
        self.signals = SlotSignals(frozenset({ATTENTION}), len(LAYERS), BLOCKS, KV_HEADS, BLOCK_SIZE, kernels,
                                   torch.device("cpu"))
        self.recorder = AttentionRecorder(self.signals, LAYERS, cpu_layout(), kernels)
        self.blocks, self.evicted = blocks, evicted
        self.lengths = {request_id: 0 for request_id in blocks}  # logical tokens computed
        self.generator = torch.Generator().manual_seed(1)

    def pages(self, request_id: str) -> RequestPages:
        return RequestPages(self.blocks[request_id], self.evicted[request_id])

    def step(self, tokens: dict[str, int], plan: StepPlan) -> None:
        """One engine step: `tokens` new tokens per request, in batch order, with the plan's windows."""
        self.recorder.before_compactions(plan, self.pages)
        request_ids = list(tokens)
        starts = [0]
        positions = []
        for request_id in request_ids:
            positions.extend(range(self.lengths[request_id], self.lengths[request_id] + tokens[request_id]))
            starts.append(starts[-1] + tokens[request_id])
            self.lengths[request_id] += tokens[request_id]
        step = StepView(request_ids, starts, torch.tensor(positions), torch.zeros(len(positions), dtype=torch.long))
        self.recorder.before_forward(plan, step)
        seq_lens = torch.tensor([self.lengths[r] - self.evicted[r] for r in request_ids], dtype=torch.int32)
        table = torch.zeros(len(request_ids), max(len(self.blocks[r]) for r in request_ids), dtype=torch.int32)
        for row, request_id in enumerate(request_ids):
            table[row, : len(self.blocks[request_id])] = torch.tensor(self.blocks[request_id])
        with self.recorder.forward_context():
            for name in LAYERS:
                query = torch.randn(len(positions), Q_HEADS, HEAD_SIZE, generator=self.generator)
                record_window_queries(name, query, self.caches[name], seq_lens, torch.tensor(starts), table, SCALE)

    def mass(self, request_id: str) -> torch.Tensor:
        return self.signals.gather(self.blocks[request_id], self.lengths[request_id] - self.evicted[request_id])[
            ATTENTION]


def run(kernels) -> tuple[Batch, list[torch.Tensor], list[int]]:
    """A prompt whose window spans two prefill chunks; two decoding requests (one with evicted slots) whose
    windows open at different steps; one that finishes inside its window. Then a compaction reads `p`, a probe
    reads `d1`, and `d2`'s window goes on (its mass is read last, after more queries than the store first held)."""
    batch = Batch(kernels, {"p": [5, 9, 2, 11, 14], "d1": [0, 7, 3], "d2": [12, 1, 20, 17], "gone": [8, 6]},
                  {"p": 0, "d1": 0, "d2": 3, "gone": 0})
    batch.lengths.update(d1=8, d2=12, gone=5)  # already decoding
    held = []
    batch.step({"p": 9, "d1": 1, "d2": 1, "gone": 1}, StepPlan(window_starts={"p": 6, "d1": 8, "gone": 5}))
    held.append(batch.recorder.requests_held())
    batch.step({"p": 7, "d1": 1, "d2": 1, "gone": 1}, StepPlan(window_starts={"p": 6, "d1": 8, "d2": 13,
                                                                               "gone": 5}))
    batch.recorder.forget(["gone"])  # finished
    held.append(batch.recorder.requests_held())
    compaction = Compaction("p", 16, 16, 12, 2, 10, decoding=False)
    batch.step({"d1": 1, "d2": 1}, StepPlan([compaction], [Probe("d1", 10, 10, 2, 2, True)], {"d2": 13}))
    masses = [batch.mass("p"), batch.mass("d1")]
    held.append(batch.recorder.requests_held())
    for _ in range(3):
        batch.step({"d2": 1}, StepPlan(window_starts={"d2": 13}))
    batch.recorder.before_compactions(StepPlan([Compaction("d2", 17, 14, 12, 2, 5, decoding=True)]), batch.pages)
    masses.append(batch.mass("d2"))
    held.append(batch.recorder.requests_held())
    return batch, masses, held


def test_deferred_mass_equals_the_mass_added_in_each_step():
    deferred, masses, held = run(TorchKernels())
    in_step, expected, _ = run(InStepTorchKernels())
    assert deferred.recorder.deferred is not None and in_step.recorder.deferred is None
    for mass, reference in zip(masses, expected):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(mass, reference, rtol=1e-5, atol=1e-6)
    # Each request's window mass sums to its queries times the query heads (each softmax sums to one).
    assert torch.allclose(masses[0].sum(), torch.tensor(10.0 * Q_HEADS * len(LAYERS)))
    # Requests holding queries: p, d1, gone; then gone finished and d2 opened; p and d1 read; d2 read.
    assert held == [3, 3, 1, 0]
    # The store grew past its first size (p's 3 + 1 + 1 queries) and kept what it held.
    assert deferred.recorder.deferred.buffer.shape[1] > 5
