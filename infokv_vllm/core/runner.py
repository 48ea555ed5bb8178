"""The platform-neutral model-runner extension, mixed into vLLM's V1 runner of each platform.

`CompressingRunnerMixin` goes in front of vLLM's `GPUModelRunner` (CUDA) or its subclass `CPUModelRunner`; a
platform adapter (`platforms/`) supplies what differs: the attention backend whose impl records the attention
signal, the KV page layout, and the kernel family. The mixin owns what is the same everywhere:

- applying the scheduler's compactions (`StepPlan.compactions`): score with the policy, move the kept KV and
  signals into the leading slots, mirror the scheduler's shortened block list; in the pool-wide mode, scoring
  probed requests (`StepPlan.probes`) and keeping their scores for the compactions the scheduler decides later;
- the length shift: per request the runner tracks `evicted` (logical tokens minus physical slots). Positions,
  RoPE, sampling and stop checks keep using logical lengths; only the compressed KV cache group's attention view
  changes: its KV lengths (`seq_lens`, `core/kept_lengths.py`) and the slots new tokens are written to (its
  `slot_mapping`) are shifted down by `evicted`. A model's sliding-window and state groups keep vLLM's lengths;
- the signal recorders the policy needs (`signals/`), called at fixed points of each step.

Every vLLM internal used here is listed in `infokv_vllm.vllm_internals.manifest` and checked by its test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

from infokv_vllm import logger
from infokv_vllm.config import compression_of
from infokv_vllm.core.block_manager import CompressedAttentionSpec
from infokv_vllm.core.kept_lengths import KeptLengths, build_at_kept_lengths
from infokv_vllm.core.paged_compactor import PagedKVCompactor
from infokv_vllm.messages import Compaction, LossCurve, Probe, StepPlan, WorkerReport, attach_report, plan_of
from infokv_vllm.kernels.families import kernel_family
from infokv_vllm.scoring import SelectionInput, eviction_losses, select_tokens
from infokv_vllm.signals import (
    ATTENTION,
    ENTROPY,
    REPRESENTATION,
    ForwardOutputs,
    NewBlocks,
    RequestPages,
    SignalRecorder,
    StepView,
)
from infokv_vllm.signals.attention import AttentionRecorder
from infokv_vllm.signals.entropy import EntropyRecorder
from infokv_vllm.signals.representation import RepresentationRecorder, wrap_decoder_layers
from infokv_vllm.signals.storage import SlotSignals

if TYPE_CHECKING:
    from infokv_vllm.core.adapter import PlatformAdapter


@dataclass
class CompactedRequest:
    """What a worker holds of one request it has compacted or probed, until the request finishes or restarts."""

    evicted: int = 0  # logical tokens minus the slots it holds: its seq_lens and slot_mapping shift down by this
    probe_scores: torch.Tensor | None = None  # pool-wide mode: [layers, kv_heads, probed slots] of its last probe


class CompressingRunnerMixin:
    platform: ClassVar[PlatformAdapter]  # set by each platform's runner class

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compression = compression_of(self.vllm_config)
        self.compacted: dict[str, CompactedRequest] = {}
        self.policy = self.compression.policy
        self.kernels = kernel_family(self.platform.kernel_family(self.compression)) if self.policy else None
        self.compactor: PagedKVCompactor | None = None
        self.signals: SlotSignals | None = None
        self.recorders: list[SignalRecorder] = []
        self._decoder_layers: dict = {}
        self._report = WorkerReport()  # until it leaves with the step's ModelRunnerOutput
        self._plan: StepPlan | None = None  # the current step's
        self._step: StepView | None = None  # the current step's, once its inputs are prepared
        self._kept_lengths: KeptLengths | None = None  # the current step's shift, where a request evicted tokens
        self._group = 0  # the compressed KV cache group's index (the full-attention layers)

    # --- set-up ---------------------------------------------------------------------------------------

    def load_model(self, *args, **kwargs) -> None:
        if not self.compression.enabled:
            return super().load_model(*args, **kwargs)
        with self.platform.model_build_context(self.policy.signals):
            super().load_model(*args, **kwargs)
        if REPRESENTATION in self.policy.signals:
            # Before vLLM compiles or captures the forward (warm-up and profiling come after loading).
            self._decoder_layers = wrap_decoder_layers(self.get_model(), self.max_num_tokens)

    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        if not self.compression.enabled:
            return specs
        # Only full-attention layers keep a KV that grows with the context; sliding-window and state layers (their
        # own KV cache groups, whose blocks vLLM's managers bound) are left to vLLM.
        for name, spec in specs.items():
            if type(spec) is FullAttentionSpec:
                fields = {field.name: getattr(spec, field.name) for field in dataclasses.fields(spec)}
                specs[name] = CompressedAttentionSpec(**fields)
        if not any(isinstance(spec, CompressedAttentionSpec) for spec in specs.values()):
            raise ValueError("infokv-vllm: compression found no full-attention layer to compress (layer kinds: "
                             f"{sorted({type(spec).__name__ for spec in specs.values()})})")
        return specs

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, is_profiling, *args, **kwargs)
        # Built afresh on every call: vLLM's GPU runner, when it profiles CUDA-graph memory, first initialises a
        # minimal cache of a few blocks and discards it (`is_profiling`); planes and recorders kept from that one
        # would index the real pool's blocks out of range.
        self.compactor, self.signals, self.recorders = None, None, []
        if not self.compression.enabled or is_profiling:
            return
        self._group = compressed_group(self.kv_cache_config.kv_cache_groups)
        group = self.kv_cache_config.kv_cache_groups[self._group]
        build_at_kept_lengths(self.attn_groups[self._group], lambda: self._kept_lengths)
        layer_names = list(group.layer_names)
        layers = [self.compilation_config.static_forward_context[name] for name in layer_names]
        spec = group.kv_cache_spec
        layout = self.platform.page_layout(layers[0], spec)
        quantizations = [self.platform.layer_quantization(layer) for layer in layers]
        self.platform.self_check(self.kernels.name, self.device,
                                 quantizations[0].query_dtype(self.model_config.dtype), quantizations[0].float8)
        self.compactor = PagedKVCompactor([layer.kv_cache for layer in layers], quantizations, layout,
                                          spec.num_kv_heads, self.kernels)
        signals = self.policy.signals
        if ATTENTION in signals:
            self.platform.check_recording_attention(layers)
        if not signals:
            return
        self.signals = SlotSignals(signals, len(layers), self.kv_cache_config.num_blocks, spec.num_kv_heads,
                                   spec.block_size, self.kernels, self.device)
        if ATTENTION in signals:
            sinks = {name: self.platform.attention_sinks(layer) for name, layer in zip(layer_names, layers)}
            self.recorders.append(AttentionRecorder(self.signals, dict(zip(layer_names, quantizations)), sinks,
                                                    layout, self.kernels))
        if ENTROPY in signals:
            self.recorders.append(EntropyRecorder(self.signals, self.policy.entropy_top_k))
        if REPRESENTATION in signals:
            decoder_layers = [self._decoder_layers[extract_layer_index(name)] for name in layer_names]
            self.recorders.append(RepresentationRecorder(self.signals, decoder_layers))

    # --- the step ---------------------------------------------------------------------------------------

    def execute_model(self, scheduler_output, *args, **kwargs):
        if not self.compression.enabled:
            return super().execute_model(scheduler_output, *args, **kwargs)
        plan = plan_of(scheduler_output)
        self._forget(_restarted_request_ids(scheduler_output))
        if not scheduler_output.num_scheduled_tokens:
            # A step that only hands the last finished requests to the worker: it is idle now, and its
            # per-request state must be empty (the soak benchmark reads this line).
            logger.debug("infokv: idle worker holds per-request state of %s", self.requests_held())
        for recorder in self.recorders:
            recorder.before_step_compactions(plan, self._request_pages)
        for compaction in plan.compactions:
            self._compact(compaction)
        for probe in plan.probes:
            self._probe(probe)
        blocks = _new_blocks(scheduler_output, self._group, self.compactor.block_size)
        if self.signals is not None:
            # vLLM copies these blocks' KV in its own input update, after our compactions (which may have freed
            # the destinations) and before the forward.
            copies = scheduler_output.kv_cache_block_copies or ()
            self.signals.copy_blocks([copy.src_block_id for copy in copies], blocks.copied)
        for recorder in self.recorders:
            recorder.after_step_compactions(plan, blocks)
        self._plan = plan
        try:
            result = super().execute_model(scheduler_output, *args, **kwargs)
            if self._step is not None:
                self._after_forward(self._step)
        finally:
            self._plan = self._step = self._kept_lengths = None
        return result

    def sample_tokens(self, *args, **kwargs):
        output = super().sample_tokens(*args, **kwargs)
        # Under asynchronous scheduling the output is wrapped until its sampled tokens reach the host; the
        # scheduler receives the wrapped one.
        inner = output._model_runner_output if isinstance(output, AsyncGPUModelRunnerOutput) else output
        if self.compression.enabled and isinstance(inner, ModelRunnerOutput) and inner.req_ids:
            attach_report(inner, self._report)
            self._report = WorkerReport()
        return output

    def _model_forward(self, *args, **kwargs):
        if not self.recorders:
            return super()._model_forward(*args, **kwargs)
        # Recorders that work inside the forward (the attention signal's observation window) open it here.
        with contextlib.ExitStack() as stack:
            for recorder in self.recorders:
                stack.enter_context(recorder.forward_context())
            return super()._model_forward(*args, **kwargs)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if not self.compression.enabled:
            return result
        num_reqs = self.input_batch.num_reqs
        num_tokens = int(num_scheduled_tokens.sum())
        request_ids = list(self.input_batch.req_ids[:num_reqs])
        evicted = np.array([self._evicted_of(r) for r in request_ids], dtype=np.int64)
        block_table = self.input_batch.block_table[self._group]
        if evicted.any():
            # The compressed group's attention reads `kept` slots and writes new tokens after them; positions
            # stay logical.
            self._kept_lengths = KeptLengths(torch.from_numpy(evicted))
            per_token = torch.from_numpy(np.repeat(evicted, num_scheduled_tokens)).to(self.positions.device)
            block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1],
                                             self.positions[:num_tokens] - per_token)
        if self.recorders and self._plan is not None:
            self._step = StepView(
                request_ids=request_ids, query_starts=self.query_start_loc.cpu[: num_reqs + 1].tolist(),
                positions=self.positions[:num_tokens].cpu(),
                slots=block_table.slot_mapping.gpu[:num_tokens].clone())
            for recorder in self.recorders:
                recorder.before_forward(self._plan, self._step)
        return result

    def _after_forward(self, step: StepView) -> None:
        started = time.perf_counter()
        state = self.execute_model_state
        outputs = ForwardOutputs(hidden_states=state.hidden_states, last_logits=state.logits,
                                 compute_logits=self.model.compute_logits)
        for recorder in self.recorders:
            recorder.after_forward(step, outputs, self._report)
        self._report.seconds_scoring += time.perf_counter() - started

    # --- compaction -------------------------------------------------------------------------------------

    def _request_pages(self, request_id: str) -> RequestPages:
        return RequestPages(self.requests[request_id].block_ids[self._group], self._evicted_of(request_id))

    def _evicted_of(self, request_id: str) -> int:
        compacted = self.compacted.get(request_id)
        return 0 if compacted is None else compacted.evicted

    @property
    def evicted(self) -> dict[str, int]:
        """Per request with evicted slots: how many (logical tokens minus the slots it holds)."""
        return {request_id: state.evicted for request_id, state in self.compacted.items() if state.evicted}

    def requests_held(self) -> dict[str, int]:
        """How many requests each piece of the worker's per-request compression state holds."""
        return {"compacted": len(self.compacted), "evicted": len(self.evicted),
                "probed": sum(state.probe_scores is not None for state in self.compacted.values()),
                **{recorder.name: recorder.requests_held() for recorder in self.recorders}}

    def _forget(self, request_ids: list[str]) -> None:
        """New, resumed (after preemption: recomputed in full) and finished requests hold no evicted slots and
        no probe scores: the one place a request's `CompactedRequest` is dropped."""
        for request_id in request_ids:
            self.compacted.pop(request_id, None)
        for recorder in self.recorders:
            recorder.forget(request_ids)

    def _score(self, request_id: str, block_ids: list[int], physical_len: int, kept_len: int, sinks: int,
               window: int, decoding: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy's scores [layers, kv_heads, physical_len] of a request's slots, and the signals it read."""
        signals = self.signals.gather(block_ids, physical_len) if self.signals else {}
        scores = self.policy.scores(SelectionInput(
            request_id=request_id, num_layers=self.compactor.num_layers,
            num_kv_heads=self.compactor.num_kv_heads, physical_len=physical_len, kept_len=kept_len, sinks=sinks,
            window=window, device=self.signals.device if self.signals else torch.device("cpu"),
            signals=signals, decoding=decoding,
            keys=self.compactor.read(block_ids, physical_len) if self.policy.reads_keys(decoding) else None,
            values=self.compactor.read(block_ids, physical_len, values=True)
            if self.policy.reads_values(decoding) else None))
        return scores, signals

    def _probe(self, probe: Probe) -> None:
        """Pool-wide mode: score the request now, while its observation window's attention is fresh, keep the
        scores for the compactions the scheduler decides later, and report what each length would lose."""
        started = time.perf_counter()
        block_ids = self.requests[probe.request_id].block_ids[self._group]
        scores, signals = self._score(probe.request_id, block_ids, probe.physical_len, probe.physical_len,
                                      probe.sinks, probe.window, probe.decoding)
        self.compacted.setdefault(probe.request_id, CompactedRequest()).probe_scores = scores
        losses = eviction_losses(scores, signals[ATTENTION], probe.sinks, probe.window)
        self._report.loss_curves[probe.request_id] = LossCurve(
            probe.logical_len, probe.physical_len, probe.sinks, probe.window, losses.cpu().numpy().astype(np.float32))
        for recorder in self.recorders:
            recorder.after_probe(block_ids)
        self._report.seconds_scoring += time.perf_counter() - started

    def _compact(self, compaction: Compaction) -> None:
        state = self.requests[compaction.request_id]
        block_ids = state.block_ids[self._group]
        compacted = self.compacted.setdefault(compaction.request_id, CompactedRequest())
        assert compacted.evicted == compaction.logical_len - compaction.physical_len, (
            "worker and scheduler disagree on evicted tokens", compaction)
        compactor = self.compactor
        started = time.perf_counter()
        if compaction.copies:
            # Blocks the prefix cache shares: the compaction rewrites private copies instead.
            sources = [block_ids[index] for index, _ in compaction.copies]
            destinations = [block for _, block in compaction.copies]
            compactor.copy_blocks(sources, destinations)
            if self.signals is not None:
                self.signals.copy_blocks(sources, destinations)
            for index, block in compaction.copies:
                block_ids[index] = block
        probed, compacted.probe_scores = compacted.probe_scores, None
        if compaction.probed:
            assert probed is not None, ("the scheduler compacts with a probe this worker does not hold", compaction)
            # The probe's scores; the slots computed since are in the window (kept whatever they score).
            scores = torch.nn.functional.pad(probed, (0, compaction.physical_len - probed.shape[-1]))
        else:
            scores, _ = self._score(compaction.request_id, block_ids, compaction.physical_len, compaction.kept_len,
                                    compaction.sinks, compaction.window, compaction.decoding)
        keep = select_tokens(scores, compaction.kept_len, compaction.sinks, compaction.window)
        if compaction.probed:
            # The kept probed slots lead the compacted pages: their scores serve the next compaction too.
            compacted.probe_scores = scores.gather(-1, keep)[..., : probed.shape[-1] - (
                compaction.physical_len - compaction.kept_len)]
        chosen = time.perf_counter()
        compactor.compact(block_ids, keep)
        if self.signals is not None:
            self.signals.compact(block_ids, keep)
        self._report.seconds_scoring += chosen - started
        self._report.seconds_compacting += time.perf_counter() - chosen
        # Mirror the scheduler's block list: the tail blocks are already back in its pool.
        del block_ids[cdiv(compaction.kept_len, compactor.block_size):]
        for recorder in self.recorders:
            recorder.after_request_compacted(block_ids, compaction.probed)
        row = self.input_batch.req_id_to_index.get(compaction.request_id)
        if row is not None:
            self.input_batch.block_table.add_row(state.block_ids, row)
        compacted.evicted = compaction.logical_len - compaction.kept_len


def _restarted_request_ids(scheduler_output) -> list[str]:
    cached = scheduler_output.scheduled_cached_reqs
    return [*scheduler_output.finished_req_ids, *cached.resumed_req_ids,
            *(new.req_id for new in scheduler_output.scheduled_new_reqs)]


def compressed_group(kv_cache_groups) -> int:
    """The index of the one KV cache group of compressed (full-attention) layers among vLLM's groups."""
    indices = [index for index, group in enumerate(kv_cache_groups)
               if isinstance(group.kv_cache_spec, CompressedAttentionSpec)]
    if len(indices) != 1:
        kinds = [type(group.kv_cache_spec).__name__ for group in kv_cache_groups]
        raise ValueError(
            f"infokv-vllm: compression needs the full-attention layers in one KV cache group; vLLM's groups are "
            f"{kinds} (it splits full-attention layers over several groups where a model has more of them than of "
            "sliding-window or state layers)")
    return indices[0]


def _new_blocks(scheduler_output, group: int, block_size: int) -> NewBlocks:
    """The compressed group's blocks the scheduler hands out this step. A new or resumed request's list starts
    with its prefix-cache hit (`num_computed_tokens` tokens): those blocks are not fresh."""
    fresh, hits = [], {}
    for new in scheduler_output.scheduled_new_reqs:
        hits[new.req_id] = (new.block_ids[group], new.num_computed_tokens)
    cached = scheduler_output.scheduled_cached_reqs
    for request_id, blocks, computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
        if blocks is None:
            continue
        if request_id in cached.resumed_req_ids:
            hits[request_id] = (blocks[group], computed)
        else:
            fresh.extend(blocks[group])
    hit_ends = {}
    for request_id, (blocks, computed) in hits.items():
        fresh.extend(blocks[computed // block_size:])
        if computed and computed % block_size == 0:
            hit_ends[request_id] = blocks[computed // block_size - 1]
    copied = [copy.dst_block_id for copy in scheduler_output.kv_cache_block_copies or ()]
    return NewBlocks(fresh=fresh, copied=copied, hit_ends=hit_ends)
