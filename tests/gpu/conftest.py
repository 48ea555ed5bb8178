"""The GPU suite: skipped, each test with the reason, on machines without CUDA (CI and every CPU machine); on a
machine with CUDA it fails where its model is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GPU_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (see tests/gpu/README.md)")
    for item in items:
        if GPU_DIR in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_model_dir() -> Path:
    """$INFOKV_GPU_MODEL (e.g. the random-weight SmolLM2 the GPU bundle's `model` smoke stage writes to
    /tmp/smollm2-random), else the SmolLM2 test model where `scripts/install_cpu.sh` prepared it.

    Only a machine with CUDA gets here (elsewhere every test is skipped first), and there a missing model is an
    error: skipped tests would report a GPU run that checked nothing as a pass."""
    from infokv_testing.smollm2 import model_dir

    model = Path(os.environ["INFOKV_GPU_MODEL"]) if os.environ.get("INFOKV_GPU_MODEL") else model_dir()
    if not (model / "config.json").exists():
        pytest.fail(f"no model at {model}: set INFOKV_GPU_MODEL to a Llama-architecture model directory")
    return model


# The GPU engine: bf16, vLLM's default compilation with (piecewise) CUDA graphs, FlashAttention's block size.
# vLLM checks the utilisation share against free memory even with a fixed KV size: half leaves room for the
# test process, which holds a transformers model and CUDA context beside a `vllm serve` child.
GPU_ENGINE = {"dtype": "bfloat16", "enforce_eager": False, "block_size": 16, "kv_cache_memory_bytes": 2 * 2**30,
              "gpu_memory_utilization": 0.5}
GPU_SERVE_FLAGS = ["--dtype", "bfloat16", "--kv-cache-memory-bytes", "2G", "--max-model-len", "4096",
                   "--gpu-memory-utilization", "0.5"]
