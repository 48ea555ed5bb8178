"""Recording attention backends: vLLM's attention backends, whose impl also records the attention signal.

Each platform adapter (`platforms/`) defines, for each vLLM backend it serves, a subclass of the backend
(`Recording<vLLM's class name>`, e.g. `platforms.cuda.RecordingFlashAttentionBackend`) whose impl puts
`WindowRecordingImplMixin` in front of vLLM's impl: vLLM's kernel runs unchanged, then the observation window's
queries go to the attention signal (`signals.attention.record_window_queries`, which adds their softmax mass, or
stores them for later). While a compressing worker builds its model, vLLM's backend registry points each
backend's name at its subclass (`vllm_internals.swaps.attention_backends`), so vLLM still selects, configures and reports the
backend by its own name, and the attention output is its own kernel's.
"""

from __future__ import annotations

from typing import Any, ContextManager

from infokv_vllm.signals.attention import record_window_queries
from infokv_vllm.vllm_internals.swaps import attention_backends


class WindowRecordingImplMixin:
    """Goes in front of a vLLM attention impl (`forward(layer, query, key, value, kv_cache, attn_metadata,
    output, ...)` whose metadata has seq_lens, query_start_loc and block_table): runs vLLM's attention, then hands
    the window queries to the attention signal."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is not None:
            record_window_queries(layer.layer_name, query, kv_cache, attn_metadata.seq_lens,
                                  attn_metadata.query_start_loc, attn_metadata.block_table, self.scale)
        return output


class RecordingBackends:
    """A platform's recording subclasses of vLLM attention backends, by vLLM's backend name
    (`AttentionBackendEnum`)."""

    def __init__(self, backends: dict[str, type]) -> None:
        """`backends`: vLLM's backend name -> its recording subclass, e.g. {"CPU_ATTN": RecordingCPUAttentionBackend},
        whose `get_impl_cls` returns an impl with `WindowRecordingImplMixin` in front of vLLM's."""
        for name, backend in backends.items():
            if not issubclass(backend.get_impl_cls(), WindowRecordingImplMixin):
                raise TypeError(f"{backend.__qualname__} ({name}) does not record: its impl lacks "
                                "WindowRecordingImplMixin")
        self.backends = dict(backends)
        self.impls: tuple[type, ...] = tuple(backend.get_impl_cls() for backend in self.backends.values())

    def build_context(self) -> ContextManager:
        """Entered while the worker builds its model: vLLM resolves each backend's name to its recording subclass."""
        return attention_backends({name: f"{backend.__module__}.{backend.__qualname__}"
                                   for name, backend in self.backends.items()})

    def check(self, attention_layers: list[Any]) -> None:
        """Raise unless every layer's attention impl records the attention signal: a layer built with another
        backend would leave its signal at zero, silently."""
        for layer in attention_layers:
            if not isinstance(layer.impl, self.impls):
                raise RuntimeError(
                    f"infokv-vllm: layer {layer.layer_name} runs the attention impl {type(layer.impl).__name__}, "
                    f"which does not record the attention signal (it would stay zero); compression records it "
                    f"inside {', '.join(self.backends)} only (--attention-backend)")

