"""Our `--kv-*` flag group joins the engine flags of `vllm serve` and `vllm bench` (`EngineArgs.add_cli_args`).

vLLM loads general plugins before it builds the engine flags (`AsyncEngineArgs.add_cli_args`), so the wrapper
is in place in time.
"""

from __future__ import annotations

from typing import Callable

from infokv_vllm.cli import add_cli_args
from infokv_vllm.vllm_internals.patches import wrap


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def with_our_flags(original: Callable) -> Callable:
        def wrapper(parser):
            parser = original(parser)
            add_cli_args(parser)
            return parser
        return wrapper

    wrap(EngineArgs, "add_cli_args", with_our_flags, staticmethod)
