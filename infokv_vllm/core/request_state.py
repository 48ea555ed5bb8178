"""What the scheduler holds of one request, from the first time it looks at it to the request's end.

One `RequestState` per request in the scheduler (`CompressingScheduler.state_of`), dropped in one place when vLLM
frees the request. How many slots the request has evicted is not here: the block manager owns that count
(`CompactingAttentionManager.evicted`), as it sizes the request's block list by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infokv_vllm.config import CompressionConfig
from infokv_vllm.messages import LossCurve


@dataclass
class CompressionRecord:
    """What compression did to one request, for the log line when it finishes."""

    events: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0
    peak_slots: int = 0  # the most KV slots it held (before a compaction, or when it finished)


@dataclass
class RequestState:
    """One request's compression state in the scheduler."""

    settings: CompressionConfig  # the server's, as the request overrides them
    # Per-request budgets: whether its prompt-compression point has been evaluated
    past_prompt: bool = False
    # Pool-wide mode: the logical length of its next probe (None: the end of its prompt); that of the probe whose
    # curve is on its way (sent to the workers, not reported yet); and its last probe's curve, shortened by the
    # compactions since (None until the probe's report arrives)
    next_probe: int | None = None
    awaited_curve: int | None = None
    curve: LossCurve | None = None
    record: CompressionRecord = field(default_factory=CompressionRecord)

    def accept_curve(self, curve: LossCurve) -> None:
        """Keep a reported curve if it answers the probe the request awaits. Under asynchronous scheduling it
        arrives after the next step's decisions, which may have made the workers drop the probe's scores (a
        compaction that scored afresh, a preemption) or sent a newer probe."""
        if self.awaited_curve == curve.logical_len:
            self.awaited_curve, self.curve = None, curve

    def drop_probe_scores(self) -> None:
        """The workers no longer hold the request's probe scores: neither its curve nor the one on its way says
        what a probed compaction would evict."""
        self.curve = self.awaited_curve = None

    def forget_probes(self) -> None:
        """The request lost its KV (it is recomputed after a preemption): it is probed again from the end of its
        prompt."""
        self.next_probe = None
        self.drop_probe_scores()
