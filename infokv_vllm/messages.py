"""What the scheduler and the workers tell each other each step, beside vLLM's own messages.

vLLM pickles the `SchedulerOutput` to every worker and hands one rank's `ModelRunnerOutput` back to the
scheduler; extra attributes survive both trips, so ours ride along as one typed attribute each way:

- `SchedulerOutput.infokv_plan` (`StepPlan`): compactions to apply before this step's forward, requests to
  score without compacting (the pool-wide mode's probes), and where each open observation window starts;
- `ModelRunnerOutput.infokv_report` (`WorkerReport`): what the reporting rank measured in this step, loss
  curves of the probed requests included.

`plan_of` and `report_of` read them. A missing plan is an error, never "nothing to compact": it would mean the
scheduler is not ours and compression would silently stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PLAN_ATTRIBUTE = "infokv_plan"
REPORT_ATTRIBUTE = "infokv_report"


@dataclass(frozen=True)
class Compaction:
    """One decision for one request, applied by every worker before the step's forward."""

    request_id: str
    logical_len: int  # tokens whose KV exists (num_computed_tokens); positions keep counting from here
    physical_len: int  # slots the request holds before compaction
    kept_len: int  # slots after compaction
    sinks: int  # leading tokens that are always kept (the sinks, or the whole prompt with keep_prompt)
    window: int  # most recent tokens that are always kept (the observation window)
    decoding: bool  # False for the compaction right after the prompt, True once the request decodes
    # (index in the request's block list, new block id): blocks another request may read (prefix cache) are
    # copied into a private block, which replaces them, before the compaction rewrites it
    copies: tuple[tuple[int, int], ...] = ()
    # Pool-wide mode: choose with the scores the request's last probe kept (the slots after them are in `window`)
    probed: bool = False


@dataclass(frozen=True)
class Probe:
    """Pool-wide mode: score one request as a compaction would, keep the scores, report its `LossCurve`."""

    request_id: str
    logical_len: int
    physical_len: int
    sinks: int
    window: int
    decoding: bool


@dataclass(frozen=True)
class LossCurve:
    """What evicting down to each length would lose, for one probed request, comparable across requests.

    `losses[e]` is the share of the observation window's attention (averaged over layers and KV heads) that
    falls on the e lowest-scored candidates of the probed slots, the ones a compaction evicts first; losses[0]
    is 0. Evicting e slots later, once more tokens follow the probed ones (they count as window), loses
    `losses[e]` too."""

    logical_len: int  # the probe's: which of the request's probes this curve answers
    physical_len: int  # the probed slots
    sinks: int
    window: int
    losses: np.ndarray  # float32 [physical_len - sinks - window + 1], non-decreasing


@dataclass(frozen=True)
class StepPlan:
    """The scheduler's compression instructions for one step, sent to every worker."""

    compactions: list[Compaction] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    window_starts: dict[str, int] = field(default_factory=dict)  # request id -> logical position


@dataclass
class WorkerReport:
    """What a worker measured in one step (only the reporting rank's report reaches the scheduler)."""

    loss_curves: dict[str, LossCurve] = field(default_factory=dict)  # request id -> this step's probe
    seconds_scoring: float = 0.0
    seconds_compacting: float = 0.0


def attach_plan(scheduler_output, plan: StepPlan) -> None:
    setattr(scheduler_output, PLAN_ATTRIBUTE, plan)


def plan_of(scheduler_output) -> StepPlan:
    try:
        return getattr(scheduler_output, PLAN_ATTRIBUTE)
    except AttributeError:
        raise RuntimeError("infokv-vllm: the scheduler output carries no compression plan; compression needs "
                           "infokv_vllm.core.scheduler.CompressingScheduler as vLLM's scheduler") from None


def attach_report(model_runner_output, report: WorkerReport) -> None:
    setattr(model_runner_output, REPORT_ATTRIBUTE, report)


def report_of(model_runner_output) -> WorkerReport | None:
    """The worker's report, or None for an output without requests (vLLM's shared empty output of steps that ran
    no forward; after a trip between processes it is a copy, so it is recognised by having no requests)."""
    if not model_runner_output.req_ids:
        return None
    try:
        return getattr(model_runner_output, REPORT_ATTRIBUTE)
    except AttributeError:
        raise RuntimeError("infokv-vllm: the model runner's output carries no compression report; compression "
                           "needs the worker class infokv-vllm selects for the platform") from None
