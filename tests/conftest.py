"""Shared fixtures: the offline test model and a vLLM process environment that works on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub on these machines; everything loads from the prepared local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from infokv_vllm.smollm2 import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def vllm_plugins_loaded() -> None:
    """Load general plugins the way every vLLM process does (entry-point discovery, not a direct import)."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()
