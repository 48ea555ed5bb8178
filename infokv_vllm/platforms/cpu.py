"""vLLM's CPU platform: its CPU worker and V1 runner, its CPU attention backend, its page layout, torch kernels.

- Worker: vLLM's `CPUWorker`, building `CompressingCPUModelRunner` (the core mixin over `CPUModelRunner`).
- Attention: vLLM's CPU platform always selects its `CPU_ATTN` backend, the one backend wrapped
  (`RecordingCPUAttentionBackend`, `infokv_vllm.recording_backends`).
- Pages: vLLM's CPU attention stores a page's keys column-major and its values row-major, depending on the
  instruction set; instead of hard-coding that, a marked page is written through the backend's own cache-write op
  once and the layout read back. fp8 caches (`--kv-cache-dtype fp8`, fp8_e4m3: float8_e4m3fn; fp8_e5m2:
  float8_e5m2) are uint8 pages with per-tensor scales, probed the same way.
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
from infokv_vllm.kernels.layouts import IndexedPageLayout, LayerQuantization, PageLayout
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

# The 8-bit float CPU_ATTN stores each per-tensor fp8 cache's bytes as (its cache-write op converts to it; checked by
# tests/test_cpu_pages.py)
CPU_FLOAT8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def probe_marks(float8: torch.dtype | None) -> torch.Tensor:
    """Distinct values, ascending, that a cache stores exactly when written through vLLM's op with scale 1.0: the
    probe's digits. A full-precision cache: the integers 1..128 (exact in float32, bfloat16 and float16). An fp8
    cache: every finite normal value of its format, of either sign (238 for e4m3fn, 240 for e5m2). Values the format
    does not represent would not do: vLLM's conversion rounds them its own way (0.1 is stored one step below
    torch's rounding), and near zero it flushes what torch keeps as a subnormal; a representable value is stored
    bit for bit, whatever the rounding, so reading the page back by value finds every mark."""
    if float8 is None:
        return torch.arange(1.0, 129.0)
    values = torch.arange(256, dtype=torch.uint8).view(float8).float()
    return values[values.isfinite() & (values.abs() >= torch.finfo(float8).smallest_normal)].unique()


def probe_cpu_page_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str,
                          cache_dtype: str = "auto") -> PageLayout:
    """The layout of vLLM's CPU attention pages (K half, then V half) for this model dtype, cache dtype (`auto`,
    or a per-tensor fp8 one, whose pages hold bytes) and instruction set.

    Every slot's key and value elements are marked with two digits of the slot, then with two digits of the
    dimension, each write a page of vLLM's own cache-write op, and the page read back value by value."""
    import vllm._custom_ops as ops

    float8 = CPU_FLOAT8_FORMATS.get(cache_dtype)
    marks = probe_marks(float8)
    radix = len(marks)
    if max(block_size, head_size) > radix ** 2:
        raise ValueError(f"the page layout probe takes block and head sizes up to {radix ** 2}, got "
                         f"{block_size} and {head_size}")
    slots, dims = torch.arange(block_size), torch.arange(head_size)

    def write(digits: torch.Tensor) -> torch.Tensor:
        """Write the mark of `digits` [slots, head_size] as key and value of every slot; return each page
        element's digit."""
        page = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype if float8 is None else torch.uint8)
        key_cache, value_cache = page.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        tokens = marks[digits].to(dtype)[:, None, :]  # [slots, heads=1, head_size]
        ops.cpu_attn_reshape_and_cache(tokens, tokens, key_cache, value_cache, slots, isa,
                                       kv_cache_dtype=cache_dtype)
        stored = LayerQuantization(float8).readable(page).reshape(-1).float()
        digit = torch.searchsorted(marks, stored).clamp(max=radix - 1)
        if not torch.equal(marks[digit], stored):
            raise RuntimeError(f"the CPU attention page layout probe read back values it did not write (isa={isa}, "
                               f"dtype={dtype}, kv cache dtype {cache_dtype})")
        return digit

    slot_digits = (slots[:, None] % radix, slots[:, None] // radix)
    dim_digits = (dims[None, :] % radix, dims[None, :] // radix)
    slot_of, dim_of = ((write(low.expand(block_size, head_size)) + radix * write(high.expand(block_size, head_size)))
                       for low, high in (slot_digits, dim_digits))
    is_value = (torch.arange(slot_of.numel()) >= block_size * head_size).long()
    token_index = torch.full((block_size, 2 * head_size), -1, dtype=torch.long)
    token_index[slot_of, is_value * head_size + dim_of] = torch.arange(slot_of.numel())
    if (token_index < 0).any():
        raise RuntimeError(f"could not map the CPU attention page layout (isa={isa}, dtype={dtype}, kv cache dtype "
                           f"{cache_dtype})")
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
        return probe_cpu_page_layout(attention_layer.dtype, spec.block_size, spec.head_size, attention_layer.isa,
                                     attention_layer.kv_cache_dtype)

    def float8_format(self, cache_dtype: str) -> torch.dtype:
        return CPU_FLOAT8_FORMATS[cache_dtype]

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
