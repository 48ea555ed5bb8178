"""The GPU code path's kernels (Triton window attention and compaction) inside real vLLM on CPU, under Triton's
interpreter, with a tiny random Llama: every signal the policy sees matches the torch path's."""

from __future__ import annotations

import os

import pytest
import torch
from vllm import SamplingParams

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion, scheduler_of
from infokv_vllm.kernels import compaction, window_attention
from tests.test_eviction_e2e import record_signals

pytestmark = pytest.mark.e2e

PROMPTS = {"a": "The quick brown fox jumps over the lazy dog. " * 6, "b": "One two three four five six. " * 7}


def run_with(model_dir, kernels: str):
    settings = {"method": "infokv", "budget": 48, "decode_interval": 16, "prefill_window": 16,
                "decode_window": 8, "kernels": kernels}
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with in_process_llm(model_dir, settings, num_gpu_blocks_override=16, max_model_len=256) as llm:
        assert model_runner_of(llm).kernels.name == kernels
        log = record_signals(llm)
        run_to_completion(llm, PROMPTS, params)
        return sorted(log, key=lambda entry: (entry[0], entry[1])), scheduler_of(llm).totals.events


def test_triton_kernels_match_torch_inside_vllm(tiny_llama_dir):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for kernel in (compaction._compact_plane_kernel, window_attention._window_kernel):
        assert type(kernel).__name__ == "InterpretedFunction"
    torch_log, torch_events = run_with(tiny_llama_dir, "torch")
    triton_log, triton_events = run_with(tiny_llama_dir, "triton")
    assert torch_events == triton_events >= 2 * len(PROMPTS)
    assert len(torch_log) == len(triton_log)
    for (_, kept_torch, signals_torch), (_, kept_triton, signals_triton) in zip(torch_log, triton_log):
        assert kept_torch == kept_triton
        for name, expected in signals_torch.items():
            torch.testing.assert_close(signals_triton[name], expected, rtol=1e-4,
                                       atol=1e-5 * float(expected.abs().max()))
