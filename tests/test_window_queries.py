"""The attention signal, stored in the step (in-step mode) or computed when a compaction or probe reads it
(deferred mode, torch kernels): each slot's mass must be the softmax attention its request's window queries give
it, summed over the query heads that share its KV head, whatever the batch does meanwhile.

The steps are driven the way the model runner drives the recorder (plan, then the step's view, then each layer's
attention op inside the forward context), on each page layout the recorder reads. The reference is plain torch
over the keys as the test wrote them, independent of the page layouts and the kernels."""

from __future__ import annotations

import pytest
import torch

from infokv_vllm.kernels.families import TorchKernels
from infokv_vllm.kernels.layouts import HeadMajorPageLayout, IndexedPageLayout, LayerQuantization
from infokv_vllm.messages import Compaction, Probe, StepPlan
from infokv_vllm.signals import ATTENTION, RequestPages, StepView
from infokv_vllm.signals.attention import AttentionRecorder, record_window_queries
from infokv_vllm.signals.storage import SlotSignals

LAYERS, BLOCKS, KV_HEADS, Q_HEADS, HEAD_SIZE, BLOCK_SIZE = ["a", "b"], 24, 2, 6, 8, 4
SCALE = HEAD_SIZE ** -0.5


class InStepTorchKernels(TorchKernels):
    defers_window_attention = False


def cpu_pages(keys: torch.Tensor, values: torch.Tensor, slot_order: torch.Tensor
              ) -> tuple[torch.Tensor, IndexedPageLayout]:
    """vLLM's CPU pages: keys column-major, then values row-major; `slot_order` puts the key of slot
    slot_order[c] in column c (a permutation makes the keys no strided view: the torch kernels' index path)."""
    column, slot = torch.arange(HEAD_SIZE)[None, :], torch.arange(BLOCK_SIZE)[:, None]
    pages = torch.cat([keys[:, :, slot_order].transpose(2, 3).flatten(2), values.flatten(2)], 2)
    return pages, IndexedPageLayout(torch.cat([column * BLOCK_SIZE + slot_order.argsort()[:, None],
                                               BLOCK_SIZE * HEAD_SIZE + slot * HEAD_SIZE + column], 1))


PAGE_LAYOUTS = {
    "cpu": lambda keys, values: cpu_pages(keys, values, torch.arange(BLOCK_SIZE)),
    "cpu-slots-shuffled": lambda keys, values: cpu_pages(keys, values, torch.tensor([2, 0, 3, 1])),
    # vLLM's GPU caches: [blocks, kv_heads, block_size, keys then values]
    "gpu": lambda keys, values: (torch.cat([keys, values], -1), HeadMajorPageLayout(BLOCK_SIZE, HEAD_SIZE)),
}


class Batch:
    """Requests on their pages, a KV cache per layer, the recorder under test, and the window queries each
    request's attention ran (layer, physical position, query [q_heads, head_size]) for the reference."""

    def __init__(self, kernels, page_layout: str, blocks: dict[str, list[int]], evicted: dict[str, int]) -> None:
        generator = torch.Generator().manual_seed(0)
        self.keys = {name: torch.randn(BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_SIZE, generator=generator)
                     for name in LAYERS}
        self.caches = {}
        for name in LAYERS:  # every layer's pages are laid out alike
            values = torch.randn(BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_SIZE, generator=generator)
            self.caches[name], layout = PAGE_LAYOUTS[page_layout](self.keys[name], values)
        self.signals = SlotSignals(frozenset({ATTENTION}), len(LAYERS), BLOCKS, KV_HEADS, BLOCK_SIZE, kernels,
                                   torch.device("cpu"))
        self.recorder = AttentionRecorder(self.signals, {name: LayerQuantization() for name in LAYERS},
                                          dict.fromkeys(LAYERS), layout,
                                          kernels)
        self.blocks, self.evicted = blocks, evicted
        self.lengths = {request_id: 0 for request_id in blocks}  # logical tokens computed
        self.window_queries: dict[str, list[tuple[int, int, torch.Tensor]]] = {request_id: [] for request_id in blocks}
        self.generator = torch.Generator().manual_seed(1)

    def pages(self, request_id: str) -> RequestPages:
        return RequestPages(self.blocks[request_id], self.evicted[request_id])

    def step(self, tokens: dict[str, int], plan: StepPlan) -> None:
        """One engine step: `tokens` new tokens per request, in batch order, with the plan's windows."""
        self.recorder.before_step_compactions(plan, self.pages)
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
            for layer, name in enumerate(LAYERS):
                query = torch.randn(len(positions), Q_HEADS, HEAD_SIZE, generator=self.generator)
                record_window_queries(name, query, self.caches[name], seq_lens, torch.tensor(starts), table, SCALE)
                for row, request_id in enumerate(request_ids):
                    window_start = plan.window_starts.get(request_id)
                    for token in range(starts[row], starts[row + 1]):
                        if window_start is not None and positions[token] >= window_start:
                            self.window_queries[request_id].append(
                                (layer, positions[token] - self.evicted[request_id], query[token]))

    def mass(self, request_id: str) -> torch.Tensor:
        """The recorder's mass of the request's kept slots: [layers, kv_heads, kept]."""
        return self.signals.gather(self.blocks[request_id], self.lengths[request_id] - self.evicted[request_id])[
            ATTENTION]

    def reference_mass(self, request_id: str) -> torch.Tensor:
        """Each window query attends its request's slots up to its own; its query heads' probabilities add up
        on the KV head each shares (grouped-query attention: consecutive query heads share one KV head)."""
        kept = self.lengths[request_id] - self.evicted[request_id]
        mass = torch.zeros(len(LAYERS), KV_HEADS, kept)
        heads_per_kv_head = Q_HEADS // KV_HEADS
        for layer, position, query in self.window_queries[request_id]:
            # [kv_heads, slots] -> [kv_heads, kept slots, head_size], the request's pages in order
            keys = self.keys[LAYERS[layer]][self.blocks[request_id]].transpose(0, 1).flatten(1, 2)[:, :kept]
            for head in range(Q_HEADS):
                kv_head = head // heads_per_kv_head
                logits = keys[kv_head, : position + 1] @ query[head] * SCALE
                mass[layer, kv_head, : position + 1] += torch.softmax(logits, dim=0)
        return mass


def run(kernels, page_layout: str = "cpu") -> tuple[Batch, dict[str, torch.Tensor], list[int]]:
    """A prompt whose window spans two prefill chunks; two decoding requests (one with evicted slots) whose
    windows open at different steps; one that finishes inside its window. Then a compaction reads `p`, a probe
    reads `d1`, and `d2`'s window goes on (its mass is read last, after more queries than the store first held)."""
    batch = Batch(kernels, page_layout, {"p": [5, 9, 2, 11, 14], "d1": [0, 7, 3], "d2": [12, 1, 20, 17],
                                         "gone": [8, 6]}, {"p": 0, "d1": 0, "d2": 3, "gone": 0})
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
    masses = {"p": batch.mass("p"), "d1": batch.mass("d1")}
    held.append(batch.recorder.requests_held())
    for _ in range(3):
        batch.step({"d2": 1}, StepPlan(window_starts={"d2": 13}))
    batch.recorder.before_step_compactions(StepPlan([Compaction("d2", 17, 14, 12, 2, 5, decoding=True)]), batch.pages)
    masses["d2"] = batch.mass("d2")
    held.append(batch.recorder.requests_held())
    return batch, masses, held


@pytest.mark.parametrize("page_layout", PAGE_LAYOUTS)
@pytest.mark.parametrize("kernels", [TorchKernels, InStepTorchKernels], ids=["deferred", "in-step"])
def test_window_mass_is_the_softmax_attention_of_the_window_queries(kernels, page_layout):
    batch, masses, _ = run(kernels(), page_layout)
    assert (batch.recorder.deferred is not None) == kernels.defers_window_attention
    assert batch.recorder.layout.strided == (page_layout != "cpu-slots-shuffled")
    # p's window: positions 6-15 over two prefill chunks; d1's: 8 and 9 (its step-3 token is outside every
    # window); d2's: 13-17, read after its three evicted slots moved every physical position down by 3.
    assert [len(batch.window_queries[r]) for r in masses] == [10 * len(LAYERS), 2 * len(LAYERS), 5 * len(LAYERS)]
    for request_id, mass in masses.items():
        torch.testing.assert_close(mass, batch.reference_mass(request_id), rtol=1e-5, atol=1e-6,
                                   msg=lambda text, request_id=request_id: f"{request_id}: {text}")


def test_deferred_store_holds_each_window_until_it_is_read_and_grows_past_its_first_size():
    deferred, _, held = run(TorchKernels())
    # Requests holding queries: p, d1, gone; then gone finished and d2 opened; p and d1 read; d2 read.
    assert held == [3, 3, 1, 0]
    # The store grew past its first size (p's 3 + 1 + 1 queries) and kept what it held.
    assert deferred.recorder.deferred.buffer.shape[1] > 5
