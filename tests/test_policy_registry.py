"""A policy is one dataclass plus one registry line: its flag, its checks and its docs row follow from it."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from infokv_vllm import scoring
from infokv_vllm.config import ADDITIONAL_CONFIG_KEY, CompressionConfig, CompressionConfigError
from infokv_vllm.cli import add_cli_args, fold_cli_args
from infokv_vllm.scoring.base import PooledAttention, ScoringPolicy, SelectionInput
from infokv_vllm.setting_checks import setting


GUIDE = Path(__file__).parent.parent / "docs" / "adding-a-policy.md"


def guide_policy() -> type[ScoringPolicy]:
    """The policy docs/adding-a-policy.md writes, from the guide's first code block, as a module of its own: what
    the guide shows is what these tests run."""
    code = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    module = sys.modules.get("infokv_guide_keynorm")
    if module is None:
        module = types.ModuleType("infokv_guide_keynorm")
        sys.modules[module.__name__] = module  # dataclasses and type hints look a class's module up by name
        exec(compile(code, str(GUIDE), "exec"), module.__dict__)
    return module.KeyNormPolicy


@pytest.fixture
def registered(monkeypatch):
    """The registry line: the guide's policy joins `POLICIES` for this test only."""
    policy = guide_policy()
    monkeypatch.setitem(scoring.POLICIES, policy.name, policy)
    return policy


def parsed(flags: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return fold_cli_args(parser.parse_args(flags), None)[ADDITIONAL_CONFIG_KEY]


def test_a_new_policy_gets_its_flag_and_method_choice(registered):
    assert parsed(["--kv-compression", "keynorm", "--kv-power", "2"]) == {"method": "keynorm", "power": 2.0}
    config = CompressionConfig.from_settings({"method": "keynorm", "power": 2})
    assert config.policy == registered(power=2.0) and config.budget_for(4096, 100) == 1024
    help_text = argparse.ArgumentParser()
    add_cli_args(help_text)
    assert "[keynorm] Exponent applied to each key's norm. Default: 1.0." in " ".join(help_text.format_help().split())


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "keynorm", "power": 9}, "invalid --kv-power: 9.0 is outside [0, 4]"),
    ({"method": "keynorm", "power": "2"}, "invalid --kv-power: '2' is not a finite number"),
    ({"method": "snapkv", "power": 2}, "invalid --kv-power: a parameter of keynorm, not of snapkv"),
    ({"method": "keynorm", "alpha": 0.5}, "invalid --kv-alpha: a parameter of infokv, not of keynorm"),
])
def test_a_new_policys_parameters_are_checked_by_flag(registered, settings, message):
    with pytest.raises(CompressionConfigError, match="^infokv-vllm: " + re.escape(message)):
        CompressionConfig.from_settings(settings)


def test_a_new_policy_gets_its_docs_rows(registered):
    spec = importlib.util.spec_from_file_location("gen_config_docs", Path(__file__).parent.parent / "scripts" /
                                                  "gen_config_docs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert "| `keynorm` | the tokens with the largest keys | `--kv-power` |" in generator.policy_table()
    assert "| `--kv-power POWER` | `power` | `1.0` | float | [keynorm] Exponent applied" in generator.flag_table()


def test_two_declarations_of_one_parameter_name_are_refused(monkeypatch):
    @dataclass(frozen=True)
    class OwnKernel(ScoringPolicy):
        name = "own-kernel"
        summary = "declares pooling_kernel again instead of inheriting PooledAttention's"
        pooling_kernel: int = setting(3, "Another meaning.")

        def scores(self, request: SelectionInput) -> torch.Tensor:
            raise NotImplementedError

    @dataclass(frozen=True)
    class SharedKernel(PooledAttention, ScoringPolicy):
        name = "shared-kernel"
        summary = "shares pooling_kernel"

        def scores(self, request: SelectionInput) -> torch.Tensor:
            raise NotImplementedError

    monkeypatch.setitem(scoring.POLICIES, SharedKernel.name, SharedKernel)
    assert scoring.policies_with("pooling_kernel") == ["infokv", "snapkv", "rkv", "shared-kernel"]
    monkeypatch.setitem(scoring.POLICIES, OwnKernel.name, OwnKernel)
    with pytest.raises(TypeError, match="own-kernel declares its own parameter 'pooling_kernel'"):
        scoring.policy_parameters()
