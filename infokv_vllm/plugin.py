"""Registration with vLLM.

`register` is the `vllm.general_plugins` entry point. vLLM calls it in the CLI process, the engine-core
process and every worker, so it must be idempotent and cheap: it checks the vLLM version first, then applies
the changes to vLLM's objects in `PATCHES`, in order, once per process, and registers our KV cache spec.
"""

from __future__ import annotations

import sys

from infokv_vllm import __version__, logger
from infokv_vllm.cli import asks_for_compression
from infokv_vllm.config import CompressionConfig, CompressionConfigError
from infokv_vllm.vllm_internals import SUPPORTED_VLLM, vllm_version_supported
from infokv_vllm.vllm_internals.patches import (
    engine_setup,
    flag_folding,
    flag_group,
    request_admission,
    serve_exit_status,
    stat_loggers,
    stats_decoding,
)

# Each module's docstring says what it changes in vLLM and why.
PATCHES = (flag_group, flag_folding, engine_setup, stats_decoding, stat_loggers, request_admission, serve_exit_status)

_registered = False


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    global _registered
    if _registered:
        return
    import vllm

    _registered = True
    if not vllm_version_supported(vllm.__version__):
        _refuse_compression(vllm.__version__)
        return
    from infokv_vllm.core.block_manager import register_kv_cache_spec

    for patch in PATCHES:
        patch.apply()
    register_kv_cache_spec()


def _refuse_compression(vllm_version: str) -> None:
    """On a vLLM outside the supported range the plugin stays out of vLLM, except to stop any engine that asks for
    compression (a `--kv-*` flag, or its key in `additional_config`), which would otherwise run uncompressed."""
    message = (f"infokv-vllm {__version__} supports vLLM {SUPPORTED_VLLM}, but vLLM {vllm_version} is installed: "
               "compression is unavailable. Install a supported vLLM, or an infokv-vllm release for this one.")
    if asks_for_compression(sys.argv):
        raise SystemExit(message)
    logger.warning("%s The plugin is not active.", message)
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if CompressionConfig.from_additional_config(self.additional_config).enabled:
            raise CompressionConfigError(message)
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
