"""The per-slot signals scoring policies read, one module each, behind one small recorder protocol.

- `attention`: the softmax mass an observation window's queries give each cached slot (recorded inside the
  attention op, which vLLM's compiled graphs call as an opaque op and CUDA graphs leave uncaptured);
- `entropy`: the top-k entropy of the distribution each token was drawn from (measured after the forward from
  the final hidden states, and sent round through the scheduler so every rank scores with the same values);
- `representation`: how much each decoder layer rewrites a token's residual stream (recorded inside the
  forward through a `torch.library` custom op, so torch.compile keeps it).

`storage.SlotSignals` keeps every signal laid out like the KV pages, so values move with their tokens at
compaction. The model runner (`core.runner`) owns the recorders its policy needs and calls them at fixed points
of each step; a recorder sees the step only through `StepView`, never the runner's vLLM internals.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

if TYPE_CHECKING:
    from infokv_vllm.messages import StepPlan, WorkerReport
    from infokv_vllm.signals.storage import SlotSignals

ATTENTION, ENTROPY, REPRESENTATION = "attention", "entropy", "representation"


@dataclass(frozen=True)
class RequestPages:
    """Where a request's KV lives on this worker: its block ids and how many logical tokens it evicted."""

    block_ids: list[int]
    evicted: int


@dataclass(frozen=True)
class NewBlocks:
    """The blocks this step hands out, once its compactions have read the ones they freed."""

    fresh: list[int]  # nothing written in them yet
    # Private copies of prefix-cache hits (`core/block_manager.py`): their KV and signals are copied from the
    # cached blocks, but the attention there was another request's.
    copied: list[int]
    hit_ends: dict[str, int]  # request id -> the block holding the last token of its block-aligned cache hit


@dataclass(frozen=True)
class StepView:
    """One step's batch as the recorders need it (host tensors unless noted)."""

    request_ids: list[str]  # batch rows
    query_starts: list[int]  # [rows + 1]: the step's tokens of row r are query_starts[r]:query_starts[r + 1]
    positions: torch.Tensor  # [tokens] logical position of each of the step's tokens
    slots: torch.Tensor  # [tokens] physical KV slot each token is written to (device)


@dataclass(frozen=True)
class ForwardOutputs:
    """What the forward produced that recorders may measure (device tensors)."""

    hidden_states: torch.Tensor  # [tokens (maybe padded), hidden] final hidden states
    last_logits: torch.Tensor  # [rows, vocab] logits at each row's last token (what vLLM samples from)
    compute_logits: Callable[[torch.Tensor], torch.Tensor]  # hidden states -> logits (gathers across TP ranks)


class SignalRecorder:
    """Records one signal into `SlotSignals`; each hook is a no-op unless the signal needs it."""

    name: str

    def __init__(self, storage: SlotSignals) -> None:
        self.storage = storage

    def forget(self, request_ids: list[str]) -> None:
        """The requests are new, restarted after preemption, or finished: drop what is pending for them."""

    def requests_held(self) -> int:
        """How many requests this recorder holds state for (0 once every request has finished)."""
        return 0

    def before_step_compactions(self, plan: StepPlan, pages: Callable[[str], RequestPages]) -> None:
        """Store what the scheduler sent, before this step's compactions score with it."""

    def after_step_compactions(self, plan: StepPlan, blocks: NewBlocks) -> None:
        """This step's compactions are done; `blocks` were just handed out."""

    def before_forward(self, plan: StepPlan, step: StepView) -> None:
        """The step's inputs are prepared; the forward runs next."""

    def forward_context(self) -> ContextManager:
        """Entered around the model's forward (the attention signal opens its observation window here)."""
        return contextlib.nullcontext()

    def after_forward(self, step: StepView, outputs: ForwardOutputs, report: WorkerReport) -> None:
        """The forward ran; record from its outputs, and add to `report` what goes to the scheduler."""

    def after_request_compacted(self, block_ids: list[int], probed: bool) -> None:
        """A request was compacted into `block_ids`; `probed`: with the scores of its last probe (pool-wide mode),
        not with the signals as they were just now."""

    def after_probe(self, block_ids: list[int]) -> None:
        """A request in `block_ids` was scored for the pool-wide mode (its scores are kept for a later
        compaction)."""
