"""The interface each platform adapter implements (one module per platform beside this one)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager

if TYPE_CHECKING:
    from infokv_vllm.config import CompressionConfig
    from infokv_vllm.core.compaction import PageLayout

Refuse = Callable[[str, str], None]  # refuse(option, why) stops start-up with the reason


class PlatformAdapter:
    name: str
    worker_cls: str  # the `parallel_config.worker_cls` vLLM starts when compressing

    def kernel_family(self, config: CompressionConfig) -> str:
        """`torch` or `triton` for `--kv-kernels` (its `auto` resolves here)."""
        raise NotImplementedError

    def model_build_context(self, signals: frozenset[str]) -> ContextManager:
        """Entered while the worker builds the model (where vLLM resolves the attention backend)."""
        return contextlib.nullcontext()

    def page_layout(self, attention_layer: Any, spec: Any) -> PageLayout:
        """The layout of the layer's KV pages (`attention_layer.kv_cache`)."""
        raise NotImplementedError

    def check_scoring_attention(self, attention_layers: list[Any]) -> None:
        """Raise unless every layer's attention impl records the attention signal."""
        raise NotImplementedError

    def prepare_engine_args(self, engine_args: Any, config: CompressionConfig) -> None:
        """Adjust vLLM's engine arguments before its config is built (e.g. graph modes)."""

    def check_engine_config(self, vllm_config: Any, config: CompressionConfig, refuse: Refuse) -> None:
        """Refuse, at start-up, settings this platform cannot compress with."""

    def self_check(self, kernels: str, device: Any, dtype: Any) -> None:
        """Check the kernel family on the worker's device before serving; raise if it is broken."""
