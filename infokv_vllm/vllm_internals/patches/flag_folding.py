"""The `--kv-*` flags given on a command line are folded into `additional_config` (`EngineArgs.from_cli_args`).

`from_cli_args` copies only `EngineArgs`' own fields, and `additional_config` is the one channel vLLM carries to
the engine core and the workers. The folded settings are also written back into the namespace: `vllm serve` with
several API servers (`--api-server-count`, which data parallelism defaults to its size) hands that namespace to
each API-server process, whose first `from_cli_args` runs before vLLM has loaded the plugin there; without them
its frontend would not know compression is on (no admission, no metrics).
"""

from __future__ import annotations

from typing import Callable

from infokv_vllm.cli import fold_cli_args
from infokv_vllm.vllm_internals.patches import wrap


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def folding_our_flags(original: Callable) -> Callable:
        def wrapper(cls, args):
            engine_args = original(cls, args)
            engine_args.additional_config = fold_cli_args(args, engine_args.additional_config)
            args.additional_config = engine_args.additional_config
            return engine_args
        return wrapper

    wrap(EngineArgs, "from_cli_args", folding_our_flags, classmethod)
