"""vLLM's CUDA platform: its GPU worker and V1 runner, FLASH_ATTN and TRITON_ATTN, their page view, Triton kernels.

Experimental: what has run on GPU hardware, and when, is in docs/platforms.md;
every part that can run without a GPU is tested on CPU in CI (the kernels on these page views under
TRITON_INTERPRET=1, the start-up self-check, the adapter's decisions). The plugin logs one warning saying so when
it compresses on CUDA.

- Worker: vLLM's GPU `Worker`, whose documented `_make_model_runner` builds `CompressingGPUModelRunner` (the core
  mixin over vLLM's V1 `GPUModelRunner`; the V1 runner is forced when compressing, Model Runner V2 is refused).
- Attention: FLASH_ATTN and TRITON_ATTN are extended (`RecordingFlashAttentionBackend`, `RecordingTritonAttentionBackend`); their impls add the observation
  window's mass with the Triton accumulation. Any other backend vLLM picks is refused at start-up by name.
- CUDA graphs: attention is vLLM's piecewise split point, so it runs outside captured graphs and the
  accumulation runs on every step. FULL graph modes would capture attention and replay it without the
  accumulation, so they are downgraded to PIECEWISE with one log line (vLLM's default is FULL_AND_PIECEWISE).
- Asynchronous scheduling stays vLLM's default (`core/scheduler.py` says why compactions are safe under it); it
  has not run on a GPU yet, which one info line says, with `--no-async-scheduling` as the way back.
- Pages: a logical [blocks, kv_heads, block_size, 2 * head_size] view per layer, any physical stride order
  (`HeadMajorPageLayout`). Kernels: Triton (`--kv-kernels auto`), or torch.
- Start-up self-check: both Triton kernels run on small random pages of the cache's dtype (fp8 bytes for an fp8
  cache) on the GPU against the torch reference; compression refuses to start if they disagree.
- fp8 caches (`--kv-cache-dtype fp8`, per-tensor scales): the pages hold float8_e4m3fn bytes; compaction moves
  them as they are, the window attention reads them as fp8 and dequantises, and the fp8 queries vLLM hands these
  backends are dequantised with its query scale (`LayerQuantization`). Tested on CPU only.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from infokv_vllm import logger
from infokv_vllm.config import CompressionConfig, flag_name
from infokv_vllm.core.adapter import PlatformAdapter, Refuse
from infokv_vllm.core.runner import CompressingRunnerMixin
from infokv_vllm.core.worker import CompressingWorkerMixin
from infokv_vllm.kernels.layouts import HeadMajorPageLayout, PageLayout
from infokv_vllm.kernels.selfcheck import kernel_disagreements
from infokv_vllm.recording_backends import RecordingBackends, WindowRecordingImplMixin


EXPERIMENTAL_WARNING = ("infokv-vllm: compression on CUDA is experimental (docs/platforms.md says what has run on "
                        "GPUs); answer quality is measured on CPU only")
ASYNC_SCHEDULING_NOTE = ("infokv-vllm: asynchronous scheduling (vLLM's default on GPUs) with compression has not run "
                         "on a GPU yet; --no-async-scheduling schedules synchronously")


class RecordingFlashAttentionImpl(WindowRecordingImplMixin, FlashAttentionImpl):
    """vLLM's FlashAttention, then the observation window's queries to the attention signal."""


class RecordingFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[RecordingFlashAttentionImpl]:
        return RecordingFlashAttentionImpl


class RecordingTritonAttentionImpl(WindowRecordingImplMixin, TritonAttentionImpl):
    """vLLM's Triton attention, then the observation window's queries to the attention signal."""


class RecordingTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[RecordingTritonAttentionImpl]:
        return RecordingTritonAttentionImpl


# The backends whose impl records the attention signal on CUDA, by their vLLM names
RECORDING_BACKENDS = RecordingBackends({"FLASH_ATTN": RecordingFlashAttentionBackend,
                                        "TRITON_ATTN": RecordingTritonAttentionBackend})


def piecewise_graph_mode(mode: Any) -> tuple[Any, bool]:
    """The CUDA graph mode compression runs with, and whether that downgrades `mode`.

    Attention must run outside captured graphs (the accumulation is Python inside the attention op): PIECEWISE
    captures everything else. None is vLLM's unresolved default (FULL_AND_PIECEWISE on CUDA), NONE stays NONE."""
    from vllm.config.compilation import CUDAGraphMode

    if mode is None:
        return CUDAGraphMode.PIECEWISE, True
    mode = CUDAGraphMode[mode.upper()] if isinstance(mode, str) else mode
    if mode in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        return mode, False
    return CUDAGraphMode.PIECEWISE, True


class CUDAAdapter(PlatformAdapter):
    name = "cuda"
    worker_cls = "infokv_vllm.platforms.cuda.CompressingGPUWorker"
    recording_backends = RECORDING_BACKENDS

    def kernel_family(self, config: CompressionConfig) -> str:
        return "torch" if config.kernels == "torch" else "triton"

    def prepare_engine_args(self, engine_args: Any, config: CompressionConfig) -> None:
        logger.warning(EXPERIMENTAL_WARNING)
        compilation = engine_args.compilation_config
        if isinstance(compilation, dict):  # LLM(compilation_config={...})
            from vllm.config.compilation import CompilationConfig

            compilation = engine_args.compilation_config = CompilationConfig(**compilation)
        mode, downgraded = piecewise_graph_mode(compilation.cudagraph_mode)
        if downgraded:
            logger.info("infokv-vllm: CUDA graph mode %s -> PIECEWISE: attention runs outside captured graphs, so "
                        "the observation window's scoring runs on every step",
                        compilation.cudagraph_mode or "FULL_AND_PIECEWISE (vLLM's default)")
        compilation.cudagraph_mode = mode
        if engine_args.async_scheduling is not False:
            logger.info(ASYNC_SCHEDULING_NOTE)

    def page_layout(self, attention_layer: Any, spec: Any) -> PageLayout:
        layout = HeadMajorPageLayout(spec.block_size, spec.head_size)
        layout.planes(attention_layer.kv_cache)  # refuses kernel block splitting and other views, with the shape
        return layout

    def check_engine_config(self, vllm_config: Any, config: CompressionConfig, refuse: Refuse) -> None:
        backend = vllm_config.attention_config.backend
        if backend is not None and backend.name not in RECORDING_BACKENDS.backends:
            refuse(f"--attention-backend {backend.name}",
                   f"the attention signal is recorded inside {', '.join(RECORDING_BACKENDS.backends)} only")
        mode = vllm_config.compilation_config.cudagraph_mode
        if mode is not None and piecewise_graph_mode(mode)[1]:
            refuse(f"CUDA graph mode {mode.name}", "captured attention would replay without the window scoring; "
                   "use PIECEWISE")

    def float8_format(self, cache_dtype: str) -> torch.dtype:
        # FLASH_ATTN and TRITON_ATTN view every fp8 cache's bytes as the platform's fp8 type and write it through
        # that view (TRITON_ATTN's fp8_e5m2 too).
        from vllm.platforms import current_platform

        return current_platform.fp8_dtype()

    def self_check(self, kernels: str, device: torch.device, dtype: torch.dtype, float8: torch.dtype | None) -> None:
        """On the worker's GPU, before any request: both Triton kernels on small random pages in this page view
        against the torch reference; compression refuses to start if they disagree."""
        if kernels != "triton":
            return
        problems = kernel_disagreements(device, dtype, float8)
        if problems:
            cache = f"{dtype}" if float8 is None else f"{dtype} queries, {float8} cache"
            raise RuntimeError(f"infokv-vllm: {flag_name('kernels')} triton: the start-up self-check found the "
                               f"Triton kernels disagree with the torch reference on {device} ({cache}): "
                               + "; ".join(problems))


CUDA_ADAPTER = CUDAAdapter()


class CompressingGPUModelRunner(CompressingRunnerMixin, GPUModelRunner):
    platform = CUDA_ADAPTER


class CompressingGPUWorker(CompressingWorkerMixin, Worker):
    """vLLM's GPU worker with the compressing V1 model runner."""

    def _make_model_runner(self) -> CompressingGPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError("infokv-vllm: compression needs vLLM's V1 model runner; VLLM_USE_V2_MODEL_RUNNER=0 "
                               "is set by the plugin when compressing, but this worker got Model Runner V2")
        return CompressingGPUModelRunner(self.vllm_config, self.device)
