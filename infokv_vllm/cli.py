"""The `--kv-*` command-line flags: generated from `CompressionConfig`'s fields and the registered policies'
parameters, in their own help group of vLLM's engine flags, and folded into `additional_config`, the one channel vLLM carries to the engine core and the
workers (`EngineArgs.from_cli_args` copies only its own dataclass fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from infokv_vllm.config import ADDITIONAL_CONFIG_KEY, CompressionConfig, engine_setting_names, flag_name, method_names
from infokv_vllm.scoring import POLICIES, policies_with, policy_parameters
from infokv_vllm.setting_checks import choices_of, declared_types, types_of

CLI_GROUP_TITLE = "InfoKV"


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


def compression_enabled(args: argparse.Namespace) -> bool:
    """Whether the command line (`--kv-*` flags and `--additional-config`) turns compression on."""
    folded = fold_cli_args(args, getattr(args, "additional_config", None))
    return CompressionConfig.from_additional_config(folded).enabled


def asks_for_compression(argv: list[str]) -> bool:
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
