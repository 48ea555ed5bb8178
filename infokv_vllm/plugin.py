"""Registration with vLLM.

`register` is the `vllm.general_plugins` entry point. vLLM calls it in the CLI process, the engine-core
process and every worker, so it must be idempotent and cheap: it checks the vLLM version and installs the
patches of `compat` once per process, handing them the engine-argument hooks of `cli`, `engine_config` and
`admission`.
"""

from __future__ import annotations

import sys

from infokv_vllm import __version__, logger
from infokv_vllm.admission import admit_request  # noqa: F401 (an engine-argument hook of compat.apply)
from infokv_vllm.cli import add_cli_args, asks_for_compression, compression_enabled, fold_cli_args  # noqa: F401
from infokv_vllm.compat import SUPPORTED_VLLM
from infokv_vllm.config import CompressionConfig, CompressionConfigError
from infokv_vllm.engine_config import check_engine_config, compression_on, prepare_engine_args  # noqa: F401

_registered = False


def vllm_version_supported(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(version) in SpecifierSet(SUPPORTED_VLLM)


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
    from infokv_vllm import compat
    from infokv_vllm.core.block_manager import register_kv_cache_spec

    compat.apply(sys.modules[__name__])
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
