"""The model-runner extension: applies the scheduler's compactions and runs attention on the kept length.

Per request the runner tracks `evicted` (logical tokens minus physical slots). Positions, RoPE, sampling and
stop checks keep using logical lengths; only the attention view changes: the KV length (`seq_lens`) and the
slots new tokens are written to (`slot_mapping`) are shifted down by `evicted`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from infokv_vllm.config import CompressionConfig
from infokv_vllm.kv.block_manager import CompressedAttentionSpec
from infokv_vllm.kv.compaction import PagedKVCompactor, probe_cpu_page_layout
from infokv_vllm.kv.scheduler import Compaction
from infokv_vllm.scoring import SelectionInput, make_policy, select_tokens

logger = logging.getLogger(__name__)


class CompressingCPUModelRunner(CPUModelRunner):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compression = CompressionConfig.from_additional_config(self.vllm_config.additional_config)
        self.evicted: dict[str, int] = {}
        self._compactor: PagedKVCompactor | None = None
        self._policy = make_policy(self.compression) if self.compression.enabled else None

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

    def _kv_compactor(self) -> PagedKVCompactor:
        if self._compactor is None:
            (group,) = self.kv_cache_config.kv_cache_groups
            layers = [self.compilation_config.static_forward_context[name] for name in group.layer_names]
            spec = group.kv_cache_spec
            token_index = probe_cpu_page_layout(spec.dtype, spec.block_size, spec.head_size, layers[0].isa)
            self._compactor = PagedKVCompactor([layer.kv_cache for layer in layers], token_index)
        return self._compactor

    def execute_model(self, scheduler_output, *args, **kwargs):
        if self.compression.enabled:
            self._forget_restarted_requests(scheduler_output)
            for compaction in getattr(scheduler_output, "kv_compactions", ()):
                self._compact(compaction)
        return super().execute_model(scheduler_output, *args, **kwargs)

    def _forget_restarted_requests(self, scheduler_output) -> None:
        """New, resumed (after preemption: recomputed in full) and finished requests hold no evicted slots."""
        cached = scheduler_output.scheduled_cached_reqs
        for request_id in (*scheduler_output.finished_req_ids, *cached.resumed_req_ids,
                           *(new.req_id for new in scheduler_output.scheduled_new_reqs)):
            self.evicted.pop(request_id, None)

    def _compact(self, compaction: Compaction) -> None:
        compactor = self._kv_compactor()
        state = self.requests[compaction.request_id]
        (block_ids,) = state.block_ids
        assert self.evicted.get(compaction.request_id, 0) == compaction.logical_len - compaction.physical_len, (
            "worker and scheduler disagree on evicted tokens", compaction)
        scores = self._policy.scores(SelectionInput(
            request_id=compaction.request_id, num_layers=compactor.num_layers,
            num_kv_heads=compactor.num_kv_heads, kept_len=compaction.physical_len, device=torch.device("cpu")))
        keep = select_tokens(scores, compaction.kept_len, self.compression.sinks, compaction.window)
        compactor.compact(block_ids, keep)
        # Mirror the scheduler's block list: the tail blocks are already back in its pool.
        del block_ids[-(-compaction.kept_len // compactor.block_size):]
        row = self.input_batch.req_id_to_index.get(compaction.request_id)
        if row is not None:
            self.input_batch.block_table.add_row(state.block_ids, row)
        self.evicted[compaction.request_id] = compaction.logical_len - compaction.kept_len

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        num_reqs = self.input_batch.num_reqs
        evicted = np.array([self.evicted.get(r, 0) for r in self.input_batch.req_ids[:num_reqs]], dtype=np.int64)
        if evicted.any():
            # Attention reads `kept` slots and writes new tokens after them; positions stay logical.
            self.seq_lens[:num_reqs] -= torch.from_numpy(evicted).to(self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= torch.from_numpy(evicted).to(
                self.optimistic_seq_lens_cpu.dtype)
            num_tokens = int(num_scheduled_tokens.sum())
            per_token = torch.from_numpy(np.repeat(evicted, num_scheduled_tokens))
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], self.positions[:num_tokens] - per_token)
        return result
