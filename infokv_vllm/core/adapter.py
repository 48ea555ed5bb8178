"""The interface a platform adapter implements: what compression needs that differs between vLLM platforms.

Defined here, by the core that calls it; implemented by one module per platform (`infokv_vllm.platforms`). An
adapter names the worker class vLLM starts, the attention backends whose impl records the attention signal
(`infokv_vllm.recording_backends`), the layout of those backends' KV pages, and the kernel family (torch or Triton) the
worker runs, chosen once from `--kv-kernels`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

from infokv_vllm.signals import ATTENTION

if TYPE_CHECKING:
    from infokv_vllm.config import CompressionConfig
    from infokv_vllm.kernels.layouts import PageLayout

Refuse = Callable[[str, str], None]  # refuse(option, why) stops start-up with the reason


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

    def prepare_engine_args(self, engine_args: Any, config: CompressionConfig) -> None:
        """Adjust vLLM's engine arguments before its config is built (e.g. graph modes)."""

    def check_engine_config(self, vllm_config: Any, config: CompressionConfig, refuse: Refuse) -> None:
        """Refuse, at start-up, settings this platform cannot compress with."""

    def self_check(self, kernels: str, device: Any, dtype: Any) -> None:
        """Check the kernel family on the worker's device before serving; raise if it is broken."""
