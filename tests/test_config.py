"""CompressionConfig: defaults, budgets and the errors a user sees for bad values."""

import dataclasses

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
        ({"method": "infokv", "budget": 20}, "must exceed sinks + window = 36"),
        ({"method": "infokv", "budget_ratio": 1.5}, "--kv-budget-ratio: 1.5 is outside (0, 1]"),
        ({"method": "infokv", "alpha": -0.1}, "--kv-alpha"),
        ({"method": "infokv", "redundancy": 1.5}, "--kv-redundancy: 1.5 is outside [0, 1]"),
        ({"method": "infokv", "entropy_top_k": 1}, "--kv-entropy-top-k"),
        ({"method": "infokv", "pooling_kernel": 4}, "odd"),
        ({"method": "infokv", "sinks": -1}, "--kv-sinks"),
        ({"method": "infokv", "decode_interval": 0}, "--kv-decode-interval"),
        ({"method": "infokv", "entropy_score": "max"}, "--kv-entropy-score"),
        ({"method": "infokv", "budgte": 128}, "unknown setting(s) ['budgte']"),
        ({"method": "infokv", "pool_target": 0}, "--kv-pool-target: 0 is outside (0, 1]"),
        ({"method": "infokv", "pool_target": 1.2}, "--kv-pool-target: 1.2 is outside (0, 1]"),
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
    assert CompressionConfig(method="infokv").budget_for(10_000, 100) == DEFAULT_BUDGET_TOKENS
    assert CompressionConfig(method="infokv", budget=128).budget_for(1000, 100) == 128
    # A request shorter than its budget keeps everything.
    assert CompressionConfig(method="infokv", budget=128).budget_for(100, 50) == 100
    assert CompressionConfig(method="infokv", budget_ratio=0.25).budget_for(1000, 100) == 250
    # A ratio never cuts into the sinks and window.
    assert CompressionConfig(method="infokv", budget_ratio=0.01).budget_for(1000, 100) == 37


def test_pool_wide_floors_are_the_budgets_given_or_what_compression_always_keeps():
    pool = CompressionConfig(method="infokv", pool_target=0.7)
    assert pool.pool_wide and pool.kv_bound is None  # the batch decides each request's KV
    assert pool.budget_for(1000, 100) == 37  # sinks 4 + window 32 + 1, not the default budget
    assert pool.budget_for(20, 20) == 20
    assert dataclasses.replace(pool, keep_prompt=True).budget_for(1000, 100) == 137
    assert pool.for_request({"kv_budget": 256}).budget_for(1000, 100) == 256
    assert pool.for_request({"kv_budget_ratio": 0.5}).budget_for(1000, 100) == 500
    assert not CompressionConfig(pool_target=0.7).pool_wide  # compression off


def test_a_budget_with_a_ratio_is_its_floor():
    config = CompressionConfig(method="infokv", budget_ratio=0.25, budget=128)
    assert config.budget_for(120, 120) == 120  # a short question is kept whole, not cut to 30 tokens
    assert config.budget_for(400, 120) == 128
    assert config.budget_for(1000, 120) == 250
    assert config.kv_bound is None  # the ratio still grows with the length


def test_keep_prompt_protects_the_prompt_and_budgets_the_rest():
    config = CompressionConfig(method="infokv", budget=64, keep_prompt=True)
    assert config.budget_for(120, 120) == 120  # never compressed after the prompt
    assert config.budget_for(300, 120) == 120 + 64
    assert config.protected_len(120) == 120
    assert CompressionConfig(method="infokv", budget=64).protected_len(120) == 4  # the sinks
    ratio = CompressionConfig(method="infokv", budget_ratio=0.5, keep_prompt=True)
    assert ratio.budget_for(1120, 120) == 120 + 500  # a share of the generated tokens
    assert config.kv_bound == 64 + 128  # beside the prompt, which admission adds


@pytest.mark.parametrize(("extra_args", "expected"), [
    ({"kv_keep_prompt": True}, {"keep_prompt": True, "budget": 256}),
    ({"kv_budget": 64, "kv_budget_ratio": 0.5}, {"budget": 64, "budget_ratio": 0.5}),
    ({"kv_budget_ratio": 0.5}, {"budget": None, "budget_ratio": 0.5}),
])
def test_per_request_budget_settings(extra_args, expected):
    settings = CompressionConfig(method="infokv", budget=256).for_request(extra_args)
    assert {name: getattr(settings, name) for name in expected} == expected


@pytest.mark.parametrize(("value", "expected"), [(True, True), (1, True), ("false", False), (0, False)])
def test_per_request_keep_prompt_takes_what_vllm_xargs_carries(value, expected):
    # vLLM's vllm_xargs schema has no booleans: JSON true arrives as 1.
    assert CompressionConfig(method="infokv").for_request({"kv_keep_prompt": value}).keep_prompt is expected


@pytest.mark.parametrize("value", ["yes", 2, 1.0])
def test_per_request_keep_prompt_must_be_a_boolean(value):
    with pytest.raises(CompressionConfigError, match=f"kv_keep_prompt: {value!r} is not true or false"):
        CompressionConfig(method="infokv").for_request({"kv_keep_prompt": value})
