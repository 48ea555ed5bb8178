"""The interface a platform adapter implements: what compression needs that differs between vLLM platforms.

Defined here, by the core that calls it; implemented by one module per platform (`infokv_vllm.platforms`). An
adapter names the worker class vLLM starts, the attention backends whose impl records the attention signal
(`infokv_vllm.recording_backends`), the layout of those backends' KV pages and the 8-bit float their fp8 caches hold,
and the kernel family (torch or Triton) the worker runs, chosen once from `--kv-kernels`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

from infokv_vllm.kernels.layouts import LayerQuantization, PageLayout
from infokv_vllm.signals import ATTENTION

if TYPE_CHECKING:
    from infokv_vllm.config import CompressionConfig

Refuse = Callable[[str, str], None]  # refuse(option, why) stops start-up with the reason

# vLLM's fp8 KV caches with one scale per layer for keys and one for values (its KVQuantMode.FP8_PER_TENSOR), the
# quantized caches compression serves: their bytes move exactly, and readers dequantise with two numbers.
PER_TENSOR_FP8_CACHES = ("fp8", "fp8_e4m3", "fp8_e5m2")


class AttentionRecording(Protocol):
    """vLLM attention backends whose impl records the attention signal (`recording_backends.RecordingBackends`)."""

    def build_context(self) -> ContextManager:
        """Entered while the worker builds its model: vLLM builds these backends in place of its own."""

    def check(self, attention_layers: list[Any]) -> None:
        """Raise unless every layer's attention impl records the attention signal."""


class PlatformAdapter:
    name: str
    worker_cls: str  # the `parallel_config.worker_cls` vLLM starts when compressing
    recording_backends: AttentionRecording

    def kernel_family(self, config: CompressionConfig) -> str:
        """`torch` or `triton` for `--kv-kernels` (its `auto` resolves here)."""
        raise NotImplementedError

    def model_build_context(self, signals: frozenset[str]) -> ContextManager:
        """Entered while the worker builds the model (where vLLM resolves the attention backend): the scoring
        backends in place of vLLM's where the policy needs the attention signal."""
        if ATTENTION not in signals:
            return contextlib.nullcontext()
        return self.recording_backends.build_context()

    def check_recording_attention(self, attention_layers: list[Any]) -> None:
        """Raise unless every layer's attention impl records the attention signal."""
        self.recording_backends.check(attention_layers)

    def page_layout(self, attention_layer: Any, spec: Any) -> PageLayout:
        """The layout of the layer's KV pages (`attention_layer.kv_cache`)."""
        raise NotImplementedError

    def float8_format(self, cache_dtype: str) -> Any:
        """The 8-bit float this platform's attention backends store a per-tensor fp8 cache's bytes as."""
        raise NotImplementedError

    def layer_quantization(self, attention_layer: Any) -> LayerQuantization:
        """What the numbers in the layer's KV cache, and the queries its attention op receives, mean. The scales
        are vLLM's per-tensor ones (1.0 unless the checkpoint gives some), final once the weights are loaded."""
        cache_dtype = attention_layer.kv_cache_dtype
        if cache_dtype not in PER_TENSOR_FP8_CACHES:
            return LayerQuantization()
        query_scales = None
        # vLLM's own condition (`Attention.forward`) for handing the backend fp8 queries
        if attention_layer.query_quant is not None and attention_layer.impl.supports_quant_query_input:
            query_scales = attention_layer._q_scale.detach().float().reshape(-1)
        return LayerQuantization(self.float8_format(cache_dtype), attention_layer._k_scale_float,
                                 attention_layer._v_scale_float, query_scales)

    def attention_sinks(self, attention_layer: Any) -> Any:
        """The layer's attention-sink logits [query heads of this rank] (gpt-oss), or None: vLLM's impls keep
        them as `sinks`."""
        sinks = getattr(attention_layer.impl, "sinks", None)
        return None if sinks is None else sinks.detach().float()

    def prepare_engine_args(self, engine_args: Any, config: CompressionConfig) -> None:
        """Adjust vLLM's engine arguments before its config is built (e.g. graph modes)."""

    def check_engine_config(self, vllm_config: Any, config: CompressionConfig, refuse: Refuse) -> None:
        """Refuse, at start-up, settings this platform cannot compress with."""

    def self_check(self, kernels: str, device: Any, dtype: Any, float8: Any) -> None:
        """Check the kernel family on the worker's device before serving, with queries in `dtype` and the cache in
        `dtype` or, given `float8`, fp8 bytes holding it; raise if it is broken."""
