"""Registration with vLLM and the command-line interface.

`register` is the `vllm.general_plugins` entry point. vLLM calls it in the CLI process, the engine-core
process and every worker, so it must be idempotent and cheap: it checks the vLLM version and installs the
patches of `compat` once per process, handing them this module's engine-argument hooks.

The CLI flags are generated from `CompressionConfig`'s fields and folded into `additional_config`, which is
the one channel vLLM carries to the engine core and the workers (`EngineArgs.from_cli_args` copies only its
own dataclass fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from infokv_vllm import __version__, logger
from infokv_vllm.compat import SUPPORTED_VLLM
from infokv_vllm.config import (
    ADDITIONAL_CONFIG_KEY,
    CompressionConfig,
    CompressionConfigError,
    compression_of,
    engine_setting_names,
    flag_name,
    method_names,
    misspelt_request_settings,
)
from infokv_vllm.scoring import POLICIES, policies_with, policy_parameters
from infokv_vllm.setting_checks import choices_of, declared_types, types_of


SCHEDULER_CLS = "infokv_vllm.core.scheduler.CompressingScheduler"
CLI_GROUP_TITLE = "InfoKV"

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
    if _asks_for_compression(sys.argv):
        raise SystemExit(message)
    logger.warning("%s The plugin is not active.", message)
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if CompressionConfig.from_additional_config(self.additional_config).enabled:
            raise CompressionConfigError(message)
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


def _asks_for_compression(argv: list[str]) -> bool:
    """Whether a command line gives a `--kv-*` flag (read with our own flag group), or turns compression on in
    `--additional-config`."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--additional-config")
    add_cli_args(parser)
    try:
        args, _ = parser.parse_known_args(argv[1:])
    except argparse.ArgumentError:
        return True  # a malformed `--kv-*` flag: stop with the reason rather than guess
    if any(hasattr(args, _dest(name)) for name in setting_names()):
        return True
    if args.additional_config is None or ADDITIONAL_CONFIG_KEY not in args.additional_config:
        return False
    try:
        return CompressionConfig.from_additional_config(json.loads(args.additional_config)).enabled
    except (ValueError, AttributeError):
        return True  # malformed settings of ours: stop with the reason rather than guess


# --- CLI ------------------------------------------------------------------------------------------------

def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--kv-*` flags in their own help group (`vllm serve --help=infokv` lists them).

    Unset flags stay absent from the namespace (argparse.SUPPRESS), so settings given through
    `--additional-config` are only overridden by flags the user actually typed.
    """
    if any(flag_name("method") in action.option_strings for action in parser._actions):
        return  # both AsyncEngineArgs and EngineArgs may add the engine flags to one parser
    group = parser.add_argument_group(CLI_GROUP_TITLE, description=(
        "Entropy-aware KV-cache compression by the infokv-vllm plugin. Off unless --kv-compression names a "
        f"method; the settings can also be given as additional_config={{'{ADDITIONAL_CONFIG_KEY}': {{...}}}}."))
    for name, (hint, setting_field, help_text) in flag_settings().items():
        kwargs: dict[str, Any] = {"dest": _dest(name), "default": argparse.SUPPRESS, "help": help_text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices_of(hint) is not None or name == "method":
            kwargs["choices"] = choices_of(hint) or method_names()
        else:
            kwargs["type"] = next(t for t in types_of(hint) if t in (int, float, str))
            kwargs["metavar"] = name.upper()
        if setting_field.default is not None:
            kwargs["help"] += f" Default: {setting_field.default}."
        group.add_argument(flag_name(name), **kwargs)


def flag_settings() -> dict[str, tuple[Any, dataclasses.Field, str]]:
    """Every setting a `--kv-*` flag gives, by name: its declared type, its field and its help. The engine-wide
    settings, then every registered policy's parameters, whose help names the policies that take them."""
    settings = {name: (declared_types(CompressionConfig)[name], field, field.metadata["help"])
                for name, field in _engine_fields().items()}
    methods = "; ".join(f"'{name}' {cls.summary}" for name, cls in POLICIES.items())
    hint, field, help_text = settings["method"]
    settings["method"] = (hint, field, f"{help_text} Policies: {methods}.")
    for name, field in policy_parameters().items():
        owners = policies_with(name)
        hint = declared_types(POLICIES[owners[0]])[name]
        settings[name] = (hint, field, f"[{', '.join(owners)}] {field.metadata['help']}")
    return settings


def setting_names() -> tuple[str, ...]:
    return (*engine_setting_names(), *policy_parameters())


def _engine_fields() -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(CompressionConfig) if field.name in engine_setting_names()}


def _dest(field_name: str) -> str:
    return "kv_compression_" + field_name


def fold_cli_args(args: argparse.Namespace, additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """Return `additional_config` with the `--kv-*` flags given on the command line merged in.

    Flags win over settings given through `--additional-config`; unset flags leave those untouched.
    """
    given = {name: getattr(args, _dest(name)) for name in setting_names() if hasattr(args, _dest(name))}
    merged = dict(additional_config or {})
    if given:
        previous = merged.get(ADDITIONAL_CONFIG_KEY) or {}
        if isinstance(previous, str):
            previous = {"method": previous}
        merged[ADDITIONAL_CONFIG_KEY] = {**previous, **given}
    return merged


def compression_on(vllm_config: Any) -> bool:
    """Whether an engine's config turns compression on."""
    return compression_of(vllm_config).enabled


def compression_enabled(args: argparse.Namespace) -> bool:
    """Whether the command line (`--kv-*` flags and `--additional-config`) turns compression on."""
    folded = fold_cli_args(args, getattr(args, "additional_config", None))
    return CompressionConfig.from_additional_config(folded).enabled


# --- engine configuration ---------------------------------------------------------------------------------

def prepare_engine_args(engine_args: Any) -> CompressionConfig:
    """Adjust `EngineArgs` before vLLM builds its config; refuse options we cannot honour.

    Runs in the process that creates the engine config, before the engine core and workers are spawned, so
    environment variables set here reach them.
    """
    compression = CompressionConfig.from_additional_config(engine_args.additional_config)
    if not compression.enabled:
        return compression
    from infokv_vllm.platforms import adapter_for_current_platform

    adapter = adapter_for_current_platform()
    if adapter is None:
        from vllm.platforms import current_platform

        raise CompressionConfigError(
            f"infokv-vllm: the {current_platform.device_name} platform is not supported with "
            f"{flag_name('method')} {compression.method}: this version compresses on vLLM's CPU and CUDA "
            f"platforms only. Use {flag_name('method')} none there.")
    for option, ours in (("scheduler_cls", SCHEDULER_CLS), ("worker_cls", adapter.worker_cls)):
        theirs = getattr(engine_args, option)
        if theirs not in (None, "auto", ours):
            raise CompressionConfigError(
                f"infokv-vllm: --{option.replace('_', '-')} {theirs} cannot be combined with {flag_name('method')} "
                f"{compression.method}: compression brings its own {option} ({ours}).")
        setattr(engine_args, option, ours)
    adapter.prepare_engine_args(engine_args, compression)
    # Compression hooks into the V1 model runner (vllm/v1/worker/gpu_model_runner.py); Model Runner V2 has
    # other interfaces. The variable is inherited by the spawned engine core and copied to Ray workers.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return compression


def admit_request(vllm_config: Any, prompt_len: int, params: Any) -> None:
    """Refuse a request (its prompt's length and vLLM's `SamplingParams`) that compression cannot serve: vLLM
    answers HTTP 400 naming the field, and goes on serving others.

    - Invalid per-request settings (`SamplingParams.extra_args`, the OpenAI API's `vllm_xargs`).
    - A request that cannot fit the KV pool. Compression lets `max_model_len` exceed the pool (see
      `CompressedAttentionSpec.max_memory_usage_bytes`); a request fits if its prompt plus the tokens it may
      generate do, or if compression bounds it and its prompt plus budget + interval do.

    `compat` calls it where vLLM turns a prompt into an engine request (every entry point), and earlier where
    the API server creates a request's output stream: a streaming response has started (HTTP 200) by the time
    vLLM processes the request, so a refusal there would arrive as an error event inside the stream.
    """
    from vllm.exceptions import VLLMValidationError

    server = compression_of(vllm_config)
    if params is None or not server.enabled:
        return  # with compression off, every request is vLLM's alone
    for key, ours in misspelt_request_settings(params.extra_args).items():
        logger.warning("infokv-vllm: vllm_xargs.%s is not a compression setting (did you mean %s?); it is left to "
                       "vLLM", key, ours)
    try:
        settings = server.for_request(params.extra_args)
    except CompressionConfigError as error:
        raise VLLMValidationError(str(error), parameter=f"vllm_xargs.{error.field}",
                                  value=(params.extra_args or {}).get(error.field)) from None
    num_blocks = vllm_config.cache_config.num_gpu_blocks
    if not num_blocks:
        return
    pool = (num_blocks - 1) * vllm_config.cache_config.block_size  # block 0 is vLLM's null block
    if prompt_len + params.max_tokens <= pool:
        return
    if settings.kv_bound is None:
        why = ("the request opts out of compression" if not settings.enabled else
               f"{flag_name('pool_target')} lets the batch decide each request's KV" if settings.pool_wide else
               "a budget ratio does not bound the request's KV")
        raise VLLMValidationError(
            f"infokv-vllm: the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
            f"{pool} tokens the KV cache holds, and {why}; lower max_tokens to at most "
            f"{max(pool - prompt_len, 0)}",
            parameter="max_tokens", value=params.max_tokens)
    if prompt_len + settings.kv_bound > pool:
        raise VLLMValidationError(
            f"infokv-vllm: the prompt ({prompt_len} tokens) is too long for this server's KV cache: it holds "
            f"{pool} tokens, and a compressed request needs its prompt plus budget + decode interval "
            f"({settings.kv_bound}); prompts of at most {max(pool - settings.kv_bound, 0)} tokens fit",
            parameter="prompt", value=prompt_len)


def check_engine_config(vllm_config: Any) -> None:
    """Refuse, at start-up and with the reason, vLLM features that compression cannot work with."""
    compression = compression_of(vllm_config)
    if not compression.enabled:
        return
    method = f"{flag_name('method')} {compression.method}"

    def refuse(option: str, why: str) -> None:
        raise CompressionConfigError(f"infokv-vllm: {option} is not supported with {method}: {why}")

    if vllm_config.speculative_config is not None:
        refuse("speculative decoding (--speculative-config)",
               "draft tokens are verified against KV that compression may have evicted")
    if vllm_config.kv_transfer_config is not None:
        refuse("KV connectors (--kv-transfer-config)",
               "connectors move pages by logical position, compacted pages no longer follow it")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        refuse("pipeline parallelism (--pipeline-parallel-size > 1)",
               "compaction is applied per step on all layers of one rank")
    from infokv_vllm.platforms import adapter_for_current_platform

    # prepare_engine_args, which runs first, has refused platforms without an adapter.
    adapter_for_current_platform().check_engine_config(vllm_config, compression, refuse)
    if vllm_config.cache_config.cache_dtype != "auto":
        refuse(f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype}",
               "compaction moves full-precision KV pages only")
    model_config = vllm_config.model_config
    if model_config.runner_type != "generate":
        refuse(f"--runner {model_config.runner_type}", "only generative models keep a growing KV cache")
    if model_config.use_mla:
        refuse("MLA attention models", "their latent KV has no per-head layout to select from")
    if model_config.get_sliding_window() is not None:
        refuse("sliding-window attention models", "vLLM already drops their old KV pages")
    if model_config.is_hybrid or model_config.is_attention_free:
        refuse("hybrid or attention-free models", "only full-attention layers are compressed")
    from infokv_vllm.signals import ATTENTION

    if compression.pool_wide and ATTENTION not in compression.policy.signals:
        with_attention = [name for name, policy in POLICIES.items() if ATTENTION in policy().signals]
        raise CompressionConfigError(
            f"infokv-vllm: {flag_name('pool_target')} is not supported with {method} (as configured): the "
            "pool-wide mode compares requests by the attention their observation windows give each page, which "
            f"this policy does not record; use one of {', '.join(with_attention)}", "pool_target")
    if compression.budget is not None and compression.budget >= model_config.max_model_len:
        raise CompressionConfigError(
            f"infokv-vllm: invalid {flag_name('budget')}: {compression.budget} is not smaller than the context "
            f"length (max_model_len={model_config.max_model_len}), so no request would ever be compressed. "
            f"Use a smaller budget or {flag_name('method')} none.")
