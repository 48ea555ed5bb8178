"""The CUDA adapter's decisions, checked on CPU against vLLM's own classes (no GPU here: the CUDA path is
experimental until `tests/gpu/` has run on hardware). The kernels on CUDA page views: tests/kernels."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from vllm.config import AttentionConfig
from vllm.config.compilation import CompilationConfig, CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

import infokv_vllm
from infokv_vllm.config import CompressionConfig
from infokv_vllm.core.runner import CompressingRunnerMixin
from infokv_vllm.kernels.layouts import HeadMajorPageLayout
from infokv_vllm.platforms.cuda import (
    ASYNC_SCHEDULING_NOTE,
    CUDA_ADAPTER,
    EXPERIMENTAL_WARNING,
    RECORDING_BACKENDS,
    CompressingGPUModelRunner,
    CompressingGPUWorker,
    piecewise_graph_mode,
)
from infokv_vllm.signals import ATTENTION
from tests.kernels.vllm_pages import vllm_gpu_caches

INFOKV = CompressionConfig(method="infokv", budget=256)


@pytest.mark.parametrize(("mode", "expected", "downgraded"), [
    (None, CUDAGraphMode.PIECEWISE, True),  # vLLM's default resolves to FULL_AND_PIECEWISE on CUDA
    (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.PIECEWISE, True),
    (CUDAGraphMode.FULL, CUDAGraphMode.PIECEWISE, True),
    (CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.PIECEWISE, True),
    ("full", CUDAGraphMode.PIECEWISE, True),
    (CUDAGraphMode.PIECEWISE, CUDAGraphMode.PIECEWISE, False),
    (CUDAGraphMode.NONE, CUDAGraphMode.NONE, False),
])
def test_full_cuda_graphs_are_downgraded_to_piecewise(mode, expected, downgraded):
    assert piecewise_graph_mode(mode) == (expected, downgraded)


@pytest.mark.parametrize("compilation", [CompilationConfig(), CompilationConfig(cudagraph_mode="FULL"),
                                         {"cudagraph_mode": "FULL_AND_PIECEWISE"}], ids=["default", "full", "dict"])
def test_engine_arguments_get_piecewise_graphs_with_one_log_line(compilation, smollm2_dir):
    engine_args = EngineArgs(model=str(smollm2_dir), compilation_config=compilation)
    logger, records = infokv_vllm.logger, []
    handler, level = logging.Handler(logging.INFO), logger.level
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        CUDA_ADAPTER.prepare_engine_args(engine_args, INFOKV)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert engine_args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert records.count(EXPERIMENTAL_WARNING) == 1
    assert sum("-> PIECEWISE" in message for message in records) == 1
    # Asynchronous scheduling stays vLLM's default, said once (it has not run on a GPU yet).
    assert engine_args.async_scheduling is None
    assert records.count(ASYNC_SCHEDULING_NOTE) == 1


def vllm_config(backend=None, graphs=CUDAGraphMode.PIECEWISE):
    return SimpleNamespace(attention_config=AttentionConfig(backend=backend),
                           compilation_config=CompilationConfig(cudagraph_mode=graphs))


def refusals(config) -> list[str]:
    said = []
    CUDA_ADAPTER.check_engine_config(config, INFOKV, lambda option, why: said.append(f"{option}: {why}"))
    return said


@pytest.mark.parametrize("backend", [None, AttentionBackendEnum.FLASH_ATTN, AttentionBackendEnum.TRITON_ATTN])
def test_supported_backends_are_accepted(backend):
    assert refusals(vllm_config(backend)) == []


@pytest.mark.parametrize("backend", [AttentionBackendEnum.FLASHINFER, AttentionBackendEnum.TORCH_SDPA])
def test_other_backends_are_refused_by_name(backend):
    (said,) = refusals(vllm_config(backend))
    assert said.startswith(f"--attention-backend {backend.name}: ") and "FLASH_ATTN, TRITON_ATTN" in said


def test_a_full_graph_mode_that_survived_is_refused():
    (said,) = refusals(vllm_config(graphs=CUDAGraphMode.FULL_AND_PIECEWISE))
    assert said.startswith("CUDA graph mode FULL_AND_PIECEWISE")


def test_the_model_is_built_with_the_recording_backends_in_place_of_vllms():
    defaults = {name: AttentionBackendEnum[name].get_path() for name in RECORDING_BACKENDS.backends}
    with CUDA_ADAPTER.model_build_context(frozenset({ATTENTION})):
        for name, scoring in RECORDING_BACKENDS.backends.items():
            backend = AttentionBackendEnum[name].get_class()
            vllms = backend.__mro__[1]
            assert backend is scoring and vllms.__module__.startswith("vllm.")
            assert backend.get_name() == vllms.get_name() == name, "vLLM still sees its own backend"
    assert {name: AttentionBackendEnum[name].get_path() for name in RECORDING_BACKENDS.backends} == defaults
    with CUDA_ADAPTER.model_build_context(frozenset()):  # no attention signal: vLLM's own backends
        assert AttentionBackendEnum.FLASH_ATTN.get_path() == defaults["FLASH_ATTN"]


def test_layers_without_a_recording_impl_are_refused_with_the_impl_named():
    recording_flash = RECORDING_BACKENDS.backends["FLASH_ATTN"].get_impl_cls()
    recording_triton = RECORDING_BACKENDS.backends["TRITON_ATTN"].get_impl_cls()

    def layer(impl_cls):
        return SimpleNamespace(impl=impl_cls.__new__(impl_cls), layer_name="model.layers.0.self_attn.attn")

    CUDA_ADAPTER.check_recording_attention([layer(recording_flash), layer(recording_triton)])
    with pytest.raises(RuntimeError, match="runs the attention impl FlashAttentionImpl"):
        CUDA_ADAPTER.check_recording_attention([layer(recording_flash), layer(FlashAttentionImpl)])


def test_page_layout_takes_vllms_cuda_cache_view_and_refuses_split_kernel_blocks():
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = SimpleNamespace(block_size=16, head_size=32)
    cache = vllm_gpu_caches(KVCacheLayout.LBNHC, 1, 4, 2, 16, 32, torch.bfloat16, torch.Generator())[0]
    layout = CUDA_ADAPTER.page_layout(SimpleNamespace(kv_cache=cache), spec)
    assert isinstance(layout, HeadMajorPageLayout)
    keys, values = layout.planes(cache)
    assert keys.shape == values.shape == (4, 2, 16, 32)
    split = vllm_gpu_caches(KVCacheLayout.LBNHC, 1, 8, 2, 8, 32, torch.bfloat16, torch.Generator())[0]
    with pytest.raises(ValueError, match=r"expected a \[blocks, kv_heads, 16, 64\] KV cache view"):
        CUDA_ADAPTER.page_layout(SimpleNamespace(kv_cache=split), spec)


def test_kernels_default_to_triton_on_cuda():
    assert CUDA_ADAPTER.kernel_family(INFOKV) == "triton"
    assert CUDA_ADAPTER.kernel_family(CompressionConfig(method="infokv", kernels="torch")) == "torch"


def test_the_gpu_runner_is_vllms_v1_runner_under_the_core():
    assert CompressingGPUModelRunner.__mro__[1:3] == (CompressingRunnerMixin, GPUModelRunner)
    assert CompressingGPUModelRunner.platform is CUDA_ADAPTER
    worker = CompressingGPUWorker.__new__(CompressingGPUWorker)
    worker.use_v2_model_runner = True
    with pytest.raises(RuntimeError, match="needs vLLM's V1 model runner"):
        worker._make_model_runner()


def attention_layer(cache_dtype: str, fp8_queries: bool) -> SimpleNamespace:
    """The attributes of a vLLM attention layer that say what its cache and queries hold (listed in the manifest)."""
    return SimpleNamespace(kv_cache_dtype=cache_dtype, _k_scale_float=0.5, _v_scale_float=2.0,
                           _q_scale=torch.tensor(0.25), query_quant=object() if fp8_queries else None,
                           impl=SimpleNamespace(supports_quant_query_input=fp8_queries))


def test_fp8_caches_are_read_as_the_platforms_fp8_type_with_vllm_scales():
    from infokv_vllm.kernels.layouts import LayerQuantization
    from infokv_vllm.platforms.cpu import CPU_ADAPTER

    cuda = CUDA_ADAPTER.layer_quantization(attention_layer("fp8", fp8_queries=True))
    assert (cuda.float8, cuda.key_scale, cuda.value_scale) == (torch.float8_e4m3fn, 0.5, 2.0)
    assert torch.equal(cuda.query_scales, torch.tensor([0.25]))
    cpu = CPU_ADAPTER.layer_quantization(attention_layer("fp8_e5m2", fp8_queries=False))
    assert (cpu.float8, cpu.key_scale, cpu.value_scale, cpu.query_scales) == (torch.float8_e5m2, 0.5, 2.0, None)
    assert CPU_ADAPTER.layer_quantization(attention_layer("auto", fp8_queries=False)) == LayerQuantization()
