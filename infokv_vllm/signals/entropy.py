"""The token-entropy signal: how uncertain the model was when each token was produced.

Token i's entropy is that of the distribution it was drawn from: the logits at position i - 1. It is measured
after the forward (the last token of each request already has the logits vLLM samples from; only prefill
positions before it need extra logits, computed a bounded number at a time), reported to the scheduler, and
stored from what the scheduler sends back with the request's next step. That round trip makes every
tensor-parallel rank score with the reporting rank's values.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from infokv_vllm.messages import StepPlan, TokenEntropies, WorkerReport
from infokv_vllm.signals import ENTROPY, ForwardOutputs, NewBlocks, RequestPages, SignalRecorder, StepView

# Prompt logits are computed this many positions at a time: never prompt_len x vocab at once.
ENTROPY_CHUNK_TOKENS = 256
# `top_values` splits each row of logits into runs of this many: 128 was the fastest of 128-512 on CPU for
# vocabularies of 49k and 152k.
TOP_VALUES_RUN = 128


def top_values(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row [rows, vocab], in no particular order: the same values torch.topk gives, at
    a quarter to an eighth of its cost over a vocabulary on CPU (measured: 8 x 49k logits 0.55 -> 0.11 ms).

    Only the k runs with the largest maxima can hold the row's k largest values: a value in any other run is
    at most that run's maximum, below or equal to k maxima of selected runs, which are k values already. So the
    top k is taken over those k runs (plus the vocabulary's remainder after the last whole run) only."""
    rows, vocab = logits.shape
    runs = vocab // TOP_VALUES_RUN
    if runs <= k:
        return logits.topk(k, dim=-1).values
    body = logits[:, : runs * TOP_VALUES_RUN].reshape(rows, runs, TOP_VALUES_RUN)
    best = body.amax(dim=-1).topk(k, dim=-1).indices
    candidates = body.gather(1, best[..., None].expand(rows, k, TOP_VALUES_RUN)).flatten(1)
    return torch.cat([candidates, logits[:, runs * TOP_VALUES_RUN:]], dim=1).topk(k, dim=-1, sorted=False).values


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the top-k renormalised distribution of each row, divided by log k (so it lies in [0, 1]).

    Over the top k rather than the full vocabulary: the long tail adds noise, not information (method doc).
    """
    top = top_values(logits.float(), k)
    log_probs = top.log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1) / math.log(k)


class EntropyRecorder(SignalRecorder):
    name = ENTROPY

    def __init__(self, storage, top_k: int) -> None:
        super().__init__(storage)
        self.top_k = top_k
        self._next_token_entropy: dict[str, float] = {}  # for the first token each request computes next

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._next_token_entropy.pop(request_id, None)

    def requests_held(self) -> int:
        return len(self._next_token_entropy)

    def before_compactions(self, plan: StepPlan, pages: Callable[[str], RequestPages]) -> None:
        """All but the last value belong to tokens computed in the request's previous step, which sit
        contiguously after its last compaction; the last belongs to the first token of this step, whose slot is
        known only once the step's inputs are prepared."""
        slots, values, ended_blocks, next_values = [], [], [], []
        block_size = self.storage.block_size
        for request_id, entropies in plan.entropies.items():
            request = pages(request_id)
            first = entropies.first_position - request.evicted
            indices = torch.arange(first, first + len(entropies.values) - 1)
            slots.append(self.storage.request_slots(request.block_ids, indices))
            values.append(torch.from_numpy(entropies.values[:-1]))
            self._next_token_entropy[request_id] = float(entropies.values[-1])
            if not request.evicted:
                # A token that starts a block is the one after the previous block's last slot.
                positions = np.arange(first, first + len(entropies.values))
                starts = np.flatnonzero((positions % block_size == 0) & (positions > 0))
                ended_blocks.extend(request.block_ids[position // block_size - 1] for position in positions[starts])
                next_values.extend(entropies.values[starts])
        if slots:
            self.storage.write(ENTROPY, torch.cat(slots), torch.cat(values))
        if ended_blocks:
            self.storage.next_entropy[ended_blocks] = torch.tensor(next_values, device=self.storage.device)

    def after_compactions(self, plan: StepPlan, blocks: NewBlocks) -> None:
        """A request that reuses cached blocks computes its first token without the logits before it: its entropy
        is the one the cached block kept."""
        for request_id, block in blocks.hit_ends.items():
            self._next_token_entropy[request_id] = float(self.storage.next_entropy[block])

    def after_forward(self, step: StepView, outputs: ForwardOutputs, report: WorkerReport) -> None:
        """Measure the entropies this step's logits give and report them to the scheduler; store those the
        scheduler sent for each request's first token of the step (0 for a sequence's first token, a sink).

        Every rank computes them, as `compute_logits` gathers across tensor-parallel ranks, but only the
        reporting rank's values are used."""
        starts = step.query_starts
        count = starts[-1]
        entropies = torch.empty(count)
        last = torch.tensor(starts[1:]) - 1
        entropies[last] = topk_entropy(outputs.last_logits[: len(step.request_ids)], self.top_k).cpu()
        inner = torch.ones(count, dtype=torch.bool)
        inner[last] = False
        inner = inner.nonzero().flatten()
        # Not even an empty chunk in decode-only steps: under tensor parallelism compute_logits all-gathers, and
        # vLLM's CPU all-gather dies (SIGFPE) on zero rows.
        for chunk in inner.split(ENTROPY_CHUNK_TOKENS) if len(inner) else ():
            logits = outputs.compute_logits(outputs.hidden_states[chunk.to(outputs.hidden_states.device)])
            entropies[chunk] = topk_entropy(logits, self.top_k).cpu()
        report.entropies.update({
            request_id: TokenEntropies(int(step.positions[starts[row]]) + 1,
                                       entropies[starts[row]:starts[row + 1]].numpy().astype(np.float32))
            for row, request_id in enumerate(step.request_ids)})
        first_values = torch.tensor([self._next_token_entropy.pop(request_id, 0.0)
                                     for request_id in step.request_ids])
        self.storage.write(ENTROPY, step.slots[torch.tensor(starts[:-1], device=step.slots.device)], first_values)
