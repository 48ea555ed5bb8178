"""A frontend whose engine compresses decodes the compression stats the scheduler sends beside vLLM's
`SchedulerStats`: its InputProcessor (`InputProcessor.__init__`), which it builds right before its first decoder,
declares them (`decode_compression_stats`) where its config turns compression on.
"""

from __future__ import annotations

from typing import Callable

from infokv_vllm.engine_config import compression_on
from infokv_vllm.vllm_internals.patches import wrap


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    def declaring_compression_stats(original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if compression_on(self.vllm_config):
                decode_compression_stats()
        return wrapper

    wrap(InputProcessor, "__init__", declaring_compression_stats)


def decode_compression_stats() -> None:
    """The frontend's decoders read the compression stats the scheduler sends beside vLLM's `SchedulerStats`.

    msgspec drops undeclared fields, and reads `EngineCoreOutputs`' annotations once, when the process builds its
    first decoder; every frontend (each API server, `LLM`) builds it right after its InputProcessor, which calls
    this where its engine compresses. A process whose engine does not compress keeps vLLM's own annotation, as
    without the plugin (so a second, compressing engine in that process would publish no compression metrics).
    """
    from vllm.v1.engine import EngineCoreOutputs

    from infokv_vllm.metrics import CompressionSchedulerStats

    EngineCoreOutputs.__annotations__["scheduler_stats"] = CompressionSchedulerStats | None
