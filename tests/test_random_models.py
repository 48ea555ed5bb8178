"""The random-weight Llama writer the GPU throughput benchmark uses (written on the GPU machine itself)."""

from __future__ import annotations

from math import prod

import pytest

from infokv_testing.random_models import SHAPES, tensor_shapes, write_random_llama


def test_llama_3_1_8b_shapes_have_its_parameter_count():
    # Meta's model card: 8.03 B parameters with its 128,256-token vocabulary.
    parameters = sum(prod(shape) for shape in tensor_shapes(SHAPES["llama-3.1-8b"], 128256).values())
    assert 8.02e9 < parameters < 8.04e9, parameters


def test_written_model_loads_in_transformers_with_every_weight(smollm2_dir, tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from infokv_testing import random_models

    monkeypatch.setattr(random_models, "SHARD_BYTES", 2**20)  # several shards, as the 8B model gets
    target = write_random_llama(SHAPES["tiny"], smollm2_dir, tmp_path / "tiny", dtype="float32")
    assert len(list(target.glob("model-*.safetensors"))) > 1
    model, info = LlamaForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.model.layers[0].self_attn.k_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # chat works too
    tokens = tokenizer("The lighthouse keeper", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()
