"""The compressed KV that vLLM attends to is the one the method prescribes: a transformers reference.

transformers runs the same model with the same StreamingLLM schedule applied to its own KV cache (sinks + most
recent, compressed at the same steps, RoPE positions logical). Greedy tokens must match vLLM's: a wrong slot, a
stale page or a shifted position would change them within a few tokens.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from infokv_testing.local_engine import in_process_llm, run_to_completion
from infokv_testing.transformers_reference import generate_with_streaming

pytestmark = pytest.mark.e2e

BUDGET, INTERVAL, SINKS, NEW_TOKENS = 64, 32, 4, 120
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a screw press in the city of Mainz. Before that, books "
          "in Europe were copied by hand, mostly by monks working in the scriptoria of monasteries, and a single "
          "Bible could take a scribe more than a year. Printed books spread quickly: by 1500 presses operated in "
          "more than two hundred cities, and")


def test_vllm_streaming_matches_transformers_with_the_same_evictions(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    assert len(prompt_ids) > BUDGET  # the prompt itself is compressed too
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    compression = {"method": "streaming", "budget": BUDGET, "decode_interval": INTERVAL, "sinks": SINKS}
    with in_process_llm(smollm2_dir, compression) as llm:
        vllm_tokens = run_to_completion(llm, {"doc": TokensPrompt(prompt_token_ids=prompt_ids)}, params)["doc"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference = generate_with_streaming(model, prompt_ids, BUDGET, INTERVAL, SINKS, NEW_TOKENS)
    full = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          min_new_tokens=NEW_TOKENS)[0, len(prompt_ids):].tolist()
    assert full != reference, "the schedule must change the output, or this test proves nothing"
    assert vllm_tokens == reference
