"""Compression sets its classes and refuses what it cannot support where every entry point builds its VllmConfig
(`EngineArgs.create_engine_config`): `prepare_engine_args` before vLLM builds it, `check_engine_config` after.
"""

from __future__ import annotations

from typing import Callable

from infokv_vllm.engine_config import check_engine_config, prepare_engine_args
from infokv_vllm.vllm_internals.patches import wrap


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def prepared_and_checked(original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            prepare_engine_args(self)
            vllm_config = original(self, *args, **kwargs)
            check_engine_config(vllm_config)
            return vllm_config
        return wrapper

    wrap(EngineArgs, "create_engine_config", prepared_and_checked)
