"""Scoring attention backends: vLLM's attention backends, whose impl also records the attention signal.

For each vLLM backend a platform wraps, one factory (`ScoringBackends`) builds a subclass of the backend whose
impl runs vLLM's kernel unchanged and then hands the observation window's queries to the attention signal
(`signals.attention.record_window_queries`, which adds their softmax mass, or stores them for later). While a
compressing worker builds its model, vLLM's backend registry points each wrapped name at its subclass
(`compat.attention_backends`), so vLLM still selects, configures and reports the backend by its own name, and
the attention output is its own kernel's.

vLLM resolves a backend by its class path, so the built classes are globals of this module, named
`Scoring<vLLM's class name>` (e.g. `ScoringFlashAttentionBackend` and its impl `ScoringFlashAttentionImpl`). They
exist in every process that imports a platform adapter, which a worker does before it builds its model.
"""

from __future__ import annotations

from typing import Any, ContextManager

from infokv_vllm import compat
from infokv_vllm.signals.attention import record_window_queries


class WindowScoringImplMixin:
    """Goes in front of a vLLM attention impl (`forward(layer, query, key, value, kv_cache, attn_metadata,
    output, ...)` whose metadata has seq_lens, query_start_loc and block_table): runs vLLM's attention, then hands
    the window queries to the attention signal."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is not None:
            record_window_queries(layer.layer_name, query, kv_cache, attn_metadata.seq_lens,
                                  attn_metadata.query_start_loc, attn_metadata.block_table, self.scale)
        return output


class ScoringBackends:
    """The scoring subclasses of some vLLM attention backends, by vLLM's backend name (`AttentionBackendEnum`)."""

    def __init__(self, wrapped: dict[str, type]) -> None:
        """`wrapped`: vLLM's backend name -> vLLM's backend class, e.g. {"CPU_ATTN": CPUAttentionBackend}."""
        self.backends: dict[str, type] = {name: _scoring_backend(backend) for name, backend in wrapped.items()}
        self.impls: tuple[type, ...] = tuple(backend.get_impl_cls() for backend in self.backends.values())

    def build_context(self) -> ContextManager:
        """Entered while the worker builds its model: vLLM resolves each wrapped name to its scoring backend."""
        return compat.attention_backends({name: f"{backend.__module__}.{backend.__qualname__}"
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


def _scoring_backend(backend: type) -> type:
    """The subclass of vLLM's `backend` whose impl is `WindowScoringImplMixin` over vLLM's impl."""
    impl = backend.get_impl_cls()
    scoring_impl = _module_global_class(f"Scoring{impl.__name__.removesuffix('BackendImpl').removesuffix('Impl')}"
                                        "Impl", (WindowScoringImplMixin, impl), {})
    return _module_global_class(f"Scoring{backend.__name__}", (backend,),
                                {"get_impl_cls": staticmethod(lambda: scoring_impl)})


def _module_global_class(name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
    """A class that is a global of this module under its own name, so vLLM (and pickle) find it by its path."""
    existing = globals().get(name)
    if existing is not None:  # a second adapter instance in one process: one class per name
        return existing
    cls = type(name, bases, {"__module__": __name__, "__qualname__": name, **namespace})
    globals()[name] = cls
    return cls
