"""With compression on, `vllm serve` exits with status 1 after its engine core died, so a supervisor sees the
failure (`BackgroundResources.validate_alive`, `ServeSubcommand.cmd`).

vLLM's API server stops when its engine core dies, but `vllm serve` then exits with status 0, as after a clean
shutdown. The engine core reports a fatal error with a last message (ENGINE_CORE_DEAD), which the client's
`validate_alive` turns into EngineDeadError; a shutdown that was asked for sends no such message.
"""

from __future__ import annotations

import threading
from typing import Callable

from infokv_vllm.cli import compression_enabled
from infokv_vllm.vllm_internals.patches import wrap

# Set in a frontend process whose engine core reported a fatal error (not a shutdown it was asked for).
ENGINE_DIED = threading.Event()


def apply() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.v1.engine.core_client import BackgroundResources
    from vllm.v1.engine.exceptions import EngineDeadError

    def marking_engine_death(original: Callable) -> Callable:
        def wrapper(self, frames):
            try:
                return original(self, frames)
            except EngineDeadError:
                ENGINE_DIED.set()
                raise
        return wrapper

    wrap(BackgroundResources, "validate_alive", marking_engine_death)

    def failing_after_engine_death(original: Callable) -> Callable:
        def wrapper(args):
            original(args)
            if ENGINE_DIED.is_set() and compression_enabled(args):
                raise SystemExit("infokv-vllm: the engine core died (see its error above); vllm serve exits with "
                                 "status 1")
        return wrapper

    wrap(ServeSubcommand, "cmd", failing_after_engine_death, staticmethod)
