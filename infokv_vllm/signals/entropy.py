"""The token-entropy signal: how uncertain the model was when each token was produced.

Token i's entropy is that of the distribution it was drawn from: the logits at position i - 1. It is measured
after the forward (the last token of each request already has the logits vLLM samples from; only prefill
positions before it need extra logits, computed a bounded number at a time) and stored on this worker at once:
the step's tokens but its first get the values its own logits give, and each request's next token (its KV is
written in the request's next step) keeps its value until then.

Every rank measures the same values: `compute_logits` gathers the vocabulary across tensor-parallel ranks, so
each rank takes the entropy of the same logits. Keeping them on the worker (not sending them round through the
scheduler) is what lets a compaction decided while the previous step is still in flight (vLLM's asynchronous
scheduling) score with every entropy its tokens have: the worker runs steps in order, the scheduler does not
wait for their outputs.
"""

from __future__ import annotations

import math

import torch

from infokv_vllm.messages import StepPlan, WorkerReport
from infokv_vllm.signals import ENTROPY, ForwardOutputs, NewBlocks, SignalRecorder, StepView

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

    Over the top k rather than the full vocabulary: the long tail adds noise, not information (docs/method.md).
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

    def after_step_compactions(self, plan: StepPlan, blocks: NewBlocks) -> None:
        """A request that reuses cached blocks computes its first token without the logits before it: its entropy
        is the one the cached block kept."""
        for request_id, block in blocks.hit_ends.items():
            self._next_token_entropy[request_id] = float(self.storage.next_entropy[block])

    def after_forward(self, step: StepView, outputs: ForwardOutputs, report: WorkerReport) -> None:
        """Measure the entropies this step's logits give and store them: each row's first token gets the value
        its request kept from its previous step (0 for a sequence's first token, a sink), the others their own,
        and the row's last value waits for the token it belongs to."""
        starts = step.query_starts
        count = starts[-1]
        entropies = torch.empty(count)  # row r, token t: the entropy of the token after t
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
        own = torch.empty(count)  # the entropy of each of the step's tokens
        own[1:] = entropies[:-1]
        own[starts[:-1]] = torch.tensor([self._next_token_entropy.pop(request_id, 0.0)
                                         for request_id in step.request_ids])
        self.storage.write(ENTROPY, step.slots, own)
        self._next_token_entropy.update(zip(step.request_ids, entropies[last].tolist()))
        # A block whose last slot this step wrote keeps the entropy of the token after it, for a request that
        # reuses the block from the prefix cache (it computes that token without the logits it was drawn from).
        ends = step.slots % self.storage.block_size == self.storage.block_size - 1
        self.storage.next_entropy[step.slots[ends] // self.storage.block_size] = \
            entropies.to(self.storage.device)[ends]
