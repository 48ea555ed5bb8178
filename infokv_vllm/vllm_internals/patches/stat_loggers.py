"""Our metrics join vLLM's stat loggers where compression is on (`AsyncLLM.__init__`, its `stat_loggers`).

A `vllm.stat_logger_plugins` entry point would load them for every engine, and any such plugin makes AsyncLLM
collect stats under --disable-log-stats.
"""

from __future__ import annotations

from typing import Callable

from infokv_vllm.engine_config import compression_on
from infokv_vllm.vllm_internals.patches import wrap


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    from infokv_vllm.metrics import CompressionStatLogger

    def with_our_stat_logger(original: Callable) -> Callable:
        def wrapper(self, vllm_config, *args, stat_loggers=None, **kwargs):
            if compression_on(vllm_config):
                stat_loggers = [*(stat_loggers or []), CompressionStatLogger]
            return original(self, vllm_config, *args, stat_loggers=stat_loggers, **kwargs)
        return wrapper

    wrap(AsyncLLM, "__init__", with_our_stat_logger)
