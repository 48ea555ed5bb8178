"""vLLM's CPU platform: its CPU worker and V1 runner, its CPU attention backend, its page layout, torch kernels.

- Worker: vLLM's `CPUWorker`, building `CompressingCPUModelRunner` (the core mixin over `CPUModelRunner`).
- Attention: vLLM's CPU platform always selects its `CPU_ATTN` backend, the one backend wrapped
  (`RecordingCPUAttentionBackend`, `infokv_vllm.recording_backends`).
- Pages: vLLM's CPU attention stores a page's keys column-major and its values row-major, depending on the
  instruction set; instead of hard-coding that, a marked page is written through the backend's own cache-write op
  once and the layout read back.
- Kernels: torch; Triton only under its interpreter (`TRITON_INTERPRET=1`, for testing the GPU path's kernels
  inside real vLLM), as Triton has no CPU backend.
- Ray: `--distributed-executor-backend ray` runs vLLM's Ray executor adapted to CPUs (`cpu_ray.py`), which vLLM
  0.32 itself refuses on this platform.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from infokv_vllm import logger
from infokv_vllm.config import CompressionConfig, flag_name
from infokv_vllm.core.adapter import PlatformAdapter, Refuse
from infokv_vllm.core.runner import CompressingRunnerMixin
from infokv_vllm.core.worker import CompressingWorkerMixin
from infokv_vllm.kernels.layouts import IndexedPageLayout, PageLayout
from infokv_vllm.recording_backends import RecordingBackends, WindowRecordingImplMixin
from infokv_vllm.vllm_internals.swaps import cpu_model_runner_class


class RecordingCPUAttentionImpl(WindowRecordingImplMixin, CPUAttentionBackendImpl):
    """vLLM's CPU attention, then the observation window's queries to the attention signal."""


class RecordingCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[RecordingCPUAttentionImpl]:
        return RecordingCPUAttentionImpl


# The one backend vLLM's CPU platform selects, by its vLLM name
RECORDING_BACKENDS = RecordingBackends({"CPU_ATTN": RecordingCPUAttentionBackend})

# Probe values stay below 256 so they are exact in every cache dtype (float32, bfloat16, float16).
_PROBE_RADIX = 128


def probe_cpu_page_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> PageLayout:
    """The layout of vLLM's CPU attention pages (K half, then V half) for this dtype and instruction set."""
    import vllm._custom_ops as ops

    if block_size >= _PROBE_RADIX * 2:
        raise ValueError(f"page layout probe supports block sizes below {_PROBE_RADIX * 2}, got {block_size}")
    slots = torch.arange(block_size)

    def write(marks: torch.Tensor) -> torch.Tensor:
        """Write the same per-(slot, dim) mark as key and value of every slot; return the page."""
        page = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = page.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        tokens = marks.to(dtype)[:, None, :]  # [slots, heads=1, head_size]
        ops.cpu_attn_reshape_and_cache(tokens, tokens, key_cache, value_cache, slots, isa)
        return page.reshape(-1).float().long() - 1

    dims = torch.arange(head_size)
    slot_of = write((slots[:, None] + 1).expand(block_size, head_size))
    dim_low = write((dims % _PROBE_RADIX + 1).expand(block_size, head_size))
    dim_high = write((dims // _PROBE_RADIX + 1).expand(block_size, head_size))
    dim_of = dim_high * _PROBE_RADIX + dim_low
    is_value = (torch.arange(slot_of.numel()) >= block_size * head_size).long()
    token_index = torch.full((block_size, 2 * head_size), -1, dtype=torch.long)
    token_index[slot_of, is_value * head_size + dim_of] = torch.arange(slot_of.numel())
    if (token_index < 0).any():
        raise RuntimeError(f"could not map the CPU attention page layout (isa={isa}, dtype={dtype})")
    return IndexedPageLayout(token_index)


class CPUAdapter(PlatformAdapter):
    name = "cpu"
    worker_cls = "infokv_vllm.platforms.cpu.CompressingCPUWorker"
    recording_backends = RECORDING_BACKENDS

    def kernel_family(self, config: CompressionConfig) -> str:
        return "triton" if config.kernels == "triton" else "torch"

    def prepare_engine_args(self, engine_args: Any, config: CompressionConfig) -> None:
        if engine_args.distributed_executor_backend == "ray":
            from infokv_vllm.platforms.cpu_ray import CPURayExecutor

            logger.info("infokv-vllm: --distributed-executor-backend ray on CPU runs %s (vLLM's Ray executor "
                        "with Ray's CPU resource as the device)", CPURayExecutor.__qualname__)
            engine_args.distributed_executor_backend = CPURayExecutor

    def page_layout(self, attention_layer, spec) -> PageLayout:
        return probe_cpu_page_layout(spec.dtype, spec.block_size, spec.head_size, attention_layer.isa)

    def check_engine_config(self, vllm_config, config: CompressionConfig, refuse: Refuse) -> None:
        if config.kernels == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            refuse(f"{flag_name('kernels')} triton on CPU",
                   "Triton has no CPU backend here; the kernels run on CPU only under its interpreter "
                   "(TRITON_INTERPRET=1), which is for testing")


CPU_ADAPTER = CPUAdapter()


class CompressingCPUModelRunner(CompressingRunnerMixin, CPUModelRunner):
    platform = CPU_ADAPTER


class CompressingCPUWorker(CompressingWorkerMixin, CPUWorker):
    """vLLM's CPU worker with the compressing model runner in place of its own."""

    def init_device(self) -> None:
        with cpu_model_runner_class(CompressingCPUModelRunner):
            super().init_device()
        assert isinstance(self.model_runner, CompressingCPUModelRunner), type(self.model_runner)
