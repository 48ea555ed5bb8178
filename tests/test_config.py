"""CompressionConfig: defaults, budgets and the errors a user sees for bad values."""

import pytest

from infokv_vllm.config import (
    ADDITIONAL_CONFIG_KEY,
    DEFAULT_BUDGET_TOKENS,
    CompressionConfig,
    CompressionConfigError,
)


def test_absent_settings_mean_compression_off():
    assert not CompressionConfig.from_additional_config(None).enabled
    assert not CompressionConfig.from_additional_config({"other_plugin": 1}).enabled


def test_method_name_alone_is_accepted():
    config = CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: "snapkv"})
    assert config.method == "snapkv" and config.enabled


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "bogus"}, "--kv-compression: 'bogus' is not one of"),
        ({"method": "infokv", "budget": 128, "budget_ratio": 0.5}, "not both"),
        ({"method": "infokv", "budget": 20}, "must exceed sinks + window = 36"),
        ({"method": "infokv", "budget_ratio": 1.5}, "--kv-budget-ratio: 1.5 is outside (0, 1]"),
        ({"method": "infokv", "alpha": -0.1}, "--kv-alpha"),
        ({"method": "infokv", "entropy_top_k": 1}, "--kv-entropy-top-k"),
        ({"method": "infokv", "pooling_kernel": 4}, "odd"),
        ({"method": "infokv", "sinks": -1}, "--kv-sinks"),
        ({"method": "infokv", "decode_interval": 0}, "--kv-decode-interval"),
        ({"method": "infokv", "entropy_score": "max"}, "--kv-entropy-score"),
        ({"method": "infokv", "budgte": 128}, "unknown setting(s) ['budgte']"),
    ],
)
def test_invalid_settings_name_the_option(settings, message):
    with pytest.raises(CompressionConfigError) as error:
        CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: settings})
    assert message in str(error.value)


def test_non_dict_settings_are_rejected():
    with pytest.raises(CompressionConfigError, match="must be a dict"):
        CompressionConfig.from_additional_config({ADDITIONAL_CONFIG_KEY: 128})


def test_budgets():
    assert CompressionConfig(method="infokv").budget_for(10_000) == DEFAULT_BUDGET_TOKENS
    assert CompressionConfig(method="infokv", budget=128).budget_for(1000) == 128
    # A request shorter than its budget keeps everything.
    assert CompressionConfig(method="infokv", budget=128).budget_for(100) == 100
    assert CompressionConfig(method="infokv", budget_ratio=0.25).budget_for(1000) == 250
    # A ratio never cuts into the sinks and window.
    assert CompressionConfig(method="infokv", budget_ratio=0.01).budget_for(1000) == 37
