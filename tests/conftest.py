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


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, 4 query / 2 KV heads of 32) with SmolLM2's tokenizer: fast under the
    Triton interpreter, and its head counts divide 2 for tensor parallelism. Its weights are large enough
    (initializer_range 0.1) that greedy outputs vary and depend on the context, so evictions show."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(target)
    return target
