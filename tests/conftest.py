"""Shared fixtures: the offline test model and a vLLM process environment that works on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub on these machines; everything loads from the prepared local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU through Triton's interpreter; it is chosen when a kernel is defined, so set it before
# any test imports one (vLLM engines started by the tests inherit it and keep their CPU paths).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from infokv_testing.smollm2 import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def vllm_plugins_loaded() -> None:
    """Load general plugins the way every vLLM process does (entry-point discovery, not a direct import)."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()


def _tiny_model(family: str, smollm2_dir: Path, tmp_path_factory) -> Path:
    from infokv_testing.tiny_models import write_tiny_model

    return write_tiny_model(family, smollm2_dir, tmp_path_factory.mktemp(f"tiny-{family}"))


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, 4 query / 2 KV heads of 32) with SmolLM2's tokenizer: fast under the
    Triton interpreter, and its head counts divide 2 for tensor parallelism (infokv_testing/tiny_models.py)."""
    return _tiny_model("llama", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Qwen3: q/k RMSNorm per head, 4 query / 2 KV heads of 64 over a hidden size of 128."""
    return _tiny_model("qwen3", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE: Qwen3's attention, 4 routed experts, 2 per token."""
    return _tiny_model("qwen3-moe", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Gemma 3: a sliding-window layer, then a full-attention one."""
    return _tiny_model("gemma3", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gpt_oss_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random gpt-oss: a sliding-window layer, then a full-attention one, attention sinks, experts."""
    return _tiny_model("gpt-oss", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen3_next_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Qwen3-Next: a Gated DeltaNet linear-attention layer, then a full-attention one, experts."""
    return _tiny_model("qwen3-next", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Mixtral: 4 query / 2 KV heads of 32, 4 routed experts, 2 per token."""
    return _tiny_model("mixtral", smollm2_dir, tmp_path_factory)
