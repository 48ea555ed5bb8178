"""What the scheduler and the workers tell each other each step, beside vLLM's own messages.

vLLM pickles the `SchedulerOutput` to every worker and hands one rank's `ModelRunnerOutput` back to the
scheduler; extra attributes survive both trips, so ours ride along as attributes:

- `SchedulerOutput.kv_compactions` (list[Compaction]): requests to compact before this step's forward;
- `SchedulerOutput.kv_window_starts` (dict[request id, int]): where each open observation window starts;
- `SchedulerOutput.kv_entropies` (dict[request id, TokenEntropies]): token entropies measured in the request's
  previous step;
- `ModelRunnerOutput.kv_report` (WorkerReport): what the reporting rank measured in this step.

Entropies go round through the scheduler so that every tensor-parallel rank scores with the same values, those
of the rank vLLM reports from, instead of each rank trusting its own recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Compaction:
    """One decision for one request, applied by every worker before the step's forward."""

    request_id: str
    logical_len: int  # tokens whose KV exists (num_computed_tokens); positions keep counting from here
    physical_len: int  # slots the request holds before compaction
    kept_len: int  # slots after compaction
    window: int  # most recent tokens that are always kept (the observation window)


@dataclass(frozen=True)
class TokenEntropies:
    """Entropies of a request's tokens at logical positions first_position, first_position + 1, ...

    A step that computes positions [a, b) yields the entropies of tokens a+1 .. b (token i's entropy is that of
    the distribution at position i - 1). All but the last token already have KV when the message arrives, one
    step later; the last is the first token the request computes in that step.
    """

    first_position: int
    values: np.ndarray  # float32


@dataclass
class WorkerReport:
    """What a worker measured in one step (only the reporting rank's report reaches the scheduler)."""

    entropies: dict[str, TokenEntropies] = field(default_factory=dict)
    seconds_scoring: float = 0.0
    seconds_compacting: float = 0.0
