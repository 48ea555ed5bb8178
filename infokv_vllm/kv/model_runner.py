"""The model-runner extension: applies the scheduler's compactions, runs attention on the kept length, and
records the per-slot signals the scoring policy needs.

Per request the runner tracks `evicted` (logical tokens minus physical slots). Positions, RoPE, sampling and
stop checks keep using logical lengths; only the attention view changes: the KV length (`seq_lens`) and the
slots new tokens are written to (`slot_mapping`) are shifted down by `evicted`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from infokv_vllm.attention.cpu import ScoringCPUAttentionImpl
from infokv_vllm.attention.window import ObservationWindow, observation_window
from infokv_vllm.config import CompressionConfig
from infokv_vllm.kv.block_manager import CompressedAttentionSpec
from infokv_vllm.kv.compaction import PagedKVCompactor, probe_cpu_page_layout
from infokv_vllm.kv.messages import Compaction, TokenEntropies, WorkerReport
from infokv_vllm.kv.slot_signals import SlotSignals
from infokv_vllm.scoring import SelectionInput, make_policy, select_tokens
from infokv_vllm.scoring.base import ATTENTION, ENTROPY, REPRESENTATION
from infokv_vllm.scoring.entropy import topk_entropy
from infokv_vllm.scoring.representation import representation_evolution

# Prompt logits are computed this many positions at a time: never prompt_len x vocab at once.
ENTROPY_CHUNK_TOKENS = 256


class CompressingCPUModelRunner(CPUModelRunner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compression = CompressionConfig.from_additional_config(self.vllm_config.additional_config)
        self.evicted: dict[str, int] = {}
        self._policy = make_policy(self.compression) if self.compression.enabled else None
        self._compactor: PagedKVCompactor | None = None
        self._signals: SlotSignals | None = None
        self._next_token_entropy: dict[str, float] = {}  # for the first token each request computes this step
        self._report = WorkerReport()  # until it leaves with the step's ModelRunnerOutput
        self._step_slots: torch.Tensor | None = None  # physical slot of each token of the current step
        self._window_starts: dict[str, int] = {}  # from the scheduler: where each observation window starts
        self._window: ObservationWindow | None = None  # the current step's, if any request is in its window

    # --- set-up ---------------------------------------------------------------------------------------

    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        if not self.compression.enabled:
            return specs
        for name, spec in specs.items():
            if type(spec) is not FullAttentionSpec:
                raise ValueError(f"infokv-vllm: layer {name} uses {type(spec).__name__}; compression supports "
                                 "full-attention layers only")
            fields = {field.name: getattr(spec, field.name) for field in dataclasses.fields(spec)}
            specs[name] = CompressedAttentionSpec(**fields)
        return specs

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if not self.compression.enabled:
            return
        (group,) = self.kv_cache_config.kv_cache_groups
        layers = [self.compilation_config.static_forward_context[name] for name in group.layer_names]
        self._layer_names = list(group.layer_names)
        spec = group.kv_cache_spec
        layout = probe_cpu_page_layout(spec.dtype, spec.block_size, spec.head_size, layers[0].isa)
        self._use_triton = self.compression.kernels == "triton"
        self._compactor = PagedKVCompactor([layer.kv_cache for layer in layers], layout, self._use_triton)
        if ATTENTION in self._policy.signals and not all(
                isinstance(layer.impl, ScoringCPUAttentionImpl) for layer in layers):
            raise RuntimeError("infokv-vllm: the attention layers were built without the scoring backend; the "
                               "attention signal would silently stay zero")
        if self._policy.signals:
            self._signals = SlotSignals(self._policy.signals, len(layers), layers[0].kv_cache.shape[0],
                                        spec.num_kv_heads, spec.block_size, self._use_triton)
        if REPRESENTATION in self._policy.signals:
            self._hook_decoder_layers()

    def _hook_decoder_layers(self) -> None:
        """Record 1 - cos(h_l, h_{l+1}) per token and layer from each decoder layer's residual stream."""
        index_of = {extract_layer_index(name): i for i, name in enumerate(self._layer_names)}
        for module_name, module in self.get_model().named_modules():
            if not hasattr(module, "self_attn") or not module_name.split(".")[-1].isdigit():
                continue  # decoder layers are the numbered modules that own an attention block
            layer = index_of.get(extract_layer_index(module_name))
            if layer is None:
                continue
            module.register_forward_pre_hook(self._record_layer_input, with_kwargs=True)
            module.register_forward_hook(self._make_layer_output_hook(layer), with_kwargs=True)

    def _record_layer_input(self, module, args, kwargs):
        hidden, residual = _layer_stream(args, kwargs)
        # vLLM's fused add-RMSNorm updates its inputs in place: take the residual stream before it runs.
        module._infokv_input = hidden if residual is None else hidden + residual

    def _make_layer_output_hook(self, layer: int):
        def record(module, args, kwargs, output):
            layer_input = module.__dict__.pop("_infokv_input")
            if self._step_slots is None:
                return
            hidden, residual = output
            count = len(self._step_slots)
            evolution = representation_evolution(layer_input[:count], (hidden + residual)[:count])
            self._signals.write(REPRESENTATION, self._step_slots, evolution, layer=layer)
        return record

    # --- the step ---------------------------------------------------------------------------------------

    def execute_model(self, scheduler_output, *args, **kwargs):
        if not self.compression.enabled:
            return super().execute_model(scheduler_output, *args, **kwargs)
        self._forget_restarted_requests(scheduler_output)
        if self._signals is not None and ENTROPY in self._signals.planes:
            self._write_reported_entropies(getattr(scheduler_output, "kv_entropies", {}))
        for compaction in getattr(scheduler_output, "kv_compactions", ()):
            self._compact(compaction)
        # Only now: a block the scheduler hands out this step may be one a compaction of this step freed, whose
        # accumulated attention that compaction had to read first.
        if self._signals is not None and ATTENTION in self._signals.planes:
            self._signals.zero_blocks(ATTENTION, _new_block_ids(scheduler_output))
        self._window_starts = getattr(scheduler_output, "kv_window_starts", {})
        self._window = None
        result = super().execute_model(scheduler_output, *args, **kwargs)
        if self._signals is not None and ENTROPY in self._signals.planes and self._step_slots is not None:
            started = time.perf_counter()
            self._record_entropy()
            self._report.seconds_scoring += time.perf_counter() - started
        self._step_slots = None
        return result

    def sample_tokens(self, *args, **kwargs):
        output = super().sample_tokens(*args, **kwargs)
        # vLLM answers steps without a forward with one shared empty output: the report waits for a real one.
        real = isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT
        if self.compression.enabled and real:
            output.kv_report, self._report = self._report, WorkerReport()
        return output

    def _model_forward(self, *args, **kwargs):
        with observation_window(self._window):
            return super()._model_forward(*args, **kwargs)

    def _forget_restarted_requests(self, scheduler_output) -> None:
        """New, resumed (after preemption: recomputed in full) and finished requests hold no evicted slots."""
        cached = scheduler_output.scheduled_cached_reqs
        for request_id in (*scheduler_output.finished_req_ids, *cached.resumed_req_ids,
                           *(new.req_id for new in scheduler_output.scheduled_new_reqs)):
            self.evicted.pop(request_id, None)
            self._next_token_entropy.pop(request_id, None)

    def _compact(self, compaction: Compaction) -> None:
        state = self.requests[compaction.request_id]
        (block_ids,) = state.block_ids
        assert self.evicted.get(compaction.request_id, 0) == compaction.logical_len - compaction.physical_len, (
            "worker and scheduler disagree on evicted tokens", compaction)
        compactor = self._compactor
        started = time.perf_counter()
        signals = self._signals.gather(block_ids, compaction.physical_len) if self._signals else {}
        scores = self._policy.scores(SelectionInput(
            request_id=compaction.request_id, num_layers=compactor.num_layers,
            num_kv_heads=compactor.num_kv_heads, kept_len=compaction.physical_len, sinks=self.compression.sinks,
            window=compaction.window, device=torch.device("cpu"), signals=signals))
        keep = select_tokens(scores, compaction.kept_len, self.compression.sinks, compaction.window)
        chosen = time.perf_counter()
        compactor.compact(block_ids, keep)
        if self._signals is not None:
            self._signals.compact(block_ids, keep)
        self._report.seconds_scoring += chosen - started
        self._report.seconds_compacting += time.perf_counter() - chosen
        # Mirror the scheduler's block list: the tail blocks are already back in its pool.
        del block_ids[cdiv(compaction.kept_len, compactor.block_size):]
        if self._signals is not None and ATTENTION in self._signals.planes:
            self._signals.zero_blocks(ATTENTION, block_ids)  # the next observation window starts afresh
        row = self.input_batch.req_id_to_index.get(compaction.request_id)
        if row is not None:
            self.input_batch.block_table.add_row(state.block_ids, row)
        self.evicted[compaction.request_id] = compaction.logical_len - compaction.kept_len

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if not self.compression.enabled:
            return result
        num_reqs = self.input_batch.num_reqs
        num_tokens = int(num_scheduled_tokens.sum())
        evicted = np.array([self.evicted.get(r, 0) for r in self.input_batch.req_ids[:num_reqs]], dtype=np.int64)
        if evicted.any():
            # Attention reads `kept` slots and writes new tokens after them; positions stay logical.
            self.seq_lens[:num_reqs] -= torch.from_numpy(evicted).to(self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= torch.from_numpy(evicted).to(
                self.optimistic_seq_lens_cpu.dtype)
            per_token = torch.from_numpy(np.repeat(evicted, num_scheduled_tokens))
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], self.positions[:num_tokens] - per_token)
        if self._signals is not None:
            self._step_slots = self.input_batch.block_table[0].slot_mapping.gpu[:num_tokens].clone()
            self._window = self._observation_window(num_reqs)
        return result

    def _observation_window(self, num_reqs: int) -> ObservationWindow | None:
        if not self._window_starts:
            return None
        starts = self.query_start_loc.cpu[: num_reqs + 1]
        query_tokens = {}
        for row, request_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            start = self._window_starts.get(request_id)
            if start is None:
                continue
            tokens = torch.arange(int(starts[row]), int(starts[row + 1]))
            tokens = tokens[self.positions[tokens] >= start]
            if len(tokens):
                query_tokens[row] = tokens
        if not query_tokens:
            return None
        accumulators = dict(zip(self._layer_names, self._signals.planes[ATTENTION]))
        return ObservationWindow(query_tokens, accumulators, self._compactor.layout, self._use_triton)

    def _write_reported_entropies(self, reported: dict[str, TokenEntropies]) -> None:
        """Store the entropies the scheduler sends, before this step's compactions score with them.

        All but the last belong to tokens computed in the request's previous step, which sit contiguously after
        its last compaction; the last belongs to the first token of this step, whose slot is known only once the
        step's inputs are prepared.
        """
        slots, values = [], []
        for request_id, entropies in reported.items():
            (block_ids,) = self.requests[request_id].block_ids
            first = entropies.first_position - self.evicted.get(request_id, 0)
            slots.append(self._signals.request_slots(block_ids, torch.arange(first, first + len(entropies.values) - 1)))
            values.append(torch.from_numpy(entropies.values[:-1]))
            self._next_token_entropy[request_id] = float(entropies.values[-1])
        if slots:
            self._signals.write(ENTROPY, torch.cat(slots), torch.cat(values))

    def _record_entropy(self) -> None:
        """Measure the entropies this step's logits give; report them, and store those the scheduler sent for
        the first token of each request (0 for a sequence's first token, a sink).

        Token i's entropy is that of the distribution it was drawn from: the logits at position i - 1. The last
        token of each request already has the logits vLLM samples from; only the positions before it (prefill
        chunks) need extra logits, computed a bounded number at a time. Every rank computes them, as
        `compute_logits` gathers across tensor-parallel ranks, but only the reporting rank's values are used.
        """
        state = self.execute_model_state
        count = len(self._step_slots)
        num_reqs = self.input_batch.num_reqs
        starts = self.query_start_loc.cpu[: num_reqs + 1].tolist()
        entropies = torch.empty(count)
        last = torch.tensor(starts[1:]) - 1
        entropies[last] = topk_entropy(state.logits[:num_reqs], self.compression.entropy_top_k).cpu()
        inner = torch.ones(count, dtype=torch.bool)
        inner[last] = False
        inner = inner.nonzero().flatten()
        # Not even an empty chunk in decode-only steps: under tensor parallelism compute_logits all-gathers, and
        # vLLM's CPU all-gather dies (SIGFPE) on zero rows.
        for chunk in inner.split(ENTROPY_CHUNK_TOKENS) if len(inner) else ():
            logits = self.model.compute_logits(state.hidden_states[chunk])
            entropies[chunk] = topk_entropy(logits, self.compression.entropy_top_k).cpu()
        first_tokens = torch.tensor(starts[:-1])
        for row, request_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            first, end = starts[row], starts[row + 1]
            self._report.entropies[request_id] = TokenEntropies(
                int(self.positions[first]) + 1, entropies[first:end].numpy().astype(np.float32))
        first_values = torch.tensor([self._next_token_entropy.pop(request_id, 0.0)
                                     for request_id in self.input_batch.req_ids[:num_reqs]])
        self._signals.write(ENTROPY, self._step_slots[first_tokens], first_values)


def _layer_stream(args, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, residual) of a vLLM decoder layer call: forward(positions, hidden_states, residual)."""
    values = list(args) + [kwargs[name] for name in ("positions", "hidden_states", "residual") if name in kwargs]
    return values[1], values[2]


def _new_block_ids(scheduler_output) -> list[int]:
    ids = [block for new in scheduler_output.scheduled_new_reqs for block in new.block_ids[0]]
    for blocks in scheduler_output.scheduled_cached_reqs.new_block_ids:
        if blocks is not None:
            ids.extend(blocks[0])
    return ids
