"""With vLLM's default compilation on (CPU: Dynamo and inductor), compression keeps exactly the tokens it keeps
in eager mode, and the signals it scores with still equal the transformers reference: the representation signal
is recorded through a custom op the compiler keeps, the attention signal inside vLLM's attention op."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.config import CompilationMode
from vllm.inputs import TokensPrompt

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion
from tests.test_eviction_e2e import record_signals
from tests.test_signals_reference import (  # noqa: F401 (fixtures)
    TOP_K,
    WINDOW,
    check_representation_evolution,
    check_token_entropy,
    check_window_attention,
    prompt_ids,
    transformers_outputs,
)

pytestmark = pytest.mark.e2e


def compress(model_dir, prompt_ids, eager: bool) -> tuple[list[torch.Tensor], list[dict]]:
    """Every compaction of one request (the prompt, then the decode schedule): kept indices and signals."""
    settings = {"method": "infokv", "budget": len(prompt_ids) - 20, "prefill_window": WINDOW,
                "decode_window": 8, "decode_interval": 16, "entropy_top_k": TOP_K}
    with in_process_llm(model_dir, settings, enforce_eager=eager) as llm:
        mode = llm.llm_engine.vllm_config.compilation_config.mode
        assert (mode == CompilationMode.NONE) is eager, mode
        signals = record_signals(llm)
        compactor = model_runner_of(llm).compactor
        kept, compact = [], compactor.compact

        def recording(block_ids, keep):
            kept.append(keep.clone())
            return compact(block_ids, keep)

        compactor.compact = recording
        run_to_completion(llm, {"q": TokensPrompt(prompt_token_ids=prompt_ids)},
                          SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    return kept, [entry[2] for entry in signals]


def test_compiled_keeps_the_tokens_eager_keeps(smollm2_dir, prompt_ids, transformers_outputs):
    kept_eager, _ = compress(smollm2_dir, prompt_ids, eager=True)
    kept_compiled, signals_compiled = compress(smollm2_dir, prompt_ids, eager=False)
    assert len(kept_compiled) == len(kept_eager) >= 3, "the prompt and at least two decode compressions"
    for number, (eager, compiled) in enumerate(zip(kept_eager, kept_compiled)):
        assert torch.equal(eager, compiled), f"compaction {number} keeps other tokens when compiled"
    for check in (check_window_attention, check_token_entropy, check_representation_evolution):
        check(signals_compiled[0], transformers_outputs)


def test_compiled_keeps_the_tokens_eager_keeps_in_a_sliding_window_model_with_sinks(tiny_gpt_oss_dir, prompt_ids):
    """gpt-oss's shape (a sliding-window layer, a full-attention one with sinks, routed experts): compiled, the
    full-attention group keeps what it keeps in eager mode."""
    kept_eager, _ = compress(tiny_gpt_oss_dir, prompt_ids, eager=True)
    kept_compiled, _ = compress(tiny_gpt_oss_dir, prompt_ids, eager=False)
    assert len(kept_compiled) == len(kept_eager) >= 3, "the prompt and at least two decode compressions"
    assert kept_eager[0].shape[0] == 1, "one compressed layer: the full-attention one"
    for number, (eager, compiled) in enumerate(zip(kept_eager, kept_compiled)):
        assert torch.equal(eager, compiled), f"compaction {number} keeps other tokens when compiled"
