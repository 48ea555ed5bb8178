"""SnapKV and R-KV inside vLLM keep the tokens a transformers implementation of the same policy keeps.

transformers prefills each pass-key prompt, scores the cache with the window attention it reports
(`output_attentions`) and, for R-KV, the keys in its own cache (after RoPE, as vLLM caches them), selects per
(layer, KV head) with the policy's own code, drops the rest and decodes with logical RoPE positions. vLLM runs the prompts as one batch. The kept sets must agree (up to the few near-ties
that float rounding may flip: the signals agree to 1e-3, see test_signals_reference) and, where they are
identical, so must the greedy answers. A signal summed over the wrong queries or heads, or one request's scores
leaking into another's, would change a large share of the kept set; so would keys read from the wrong slots or
heads of vLLM's pages (R-KV); a slot moved to the wrong place, the answer.
"""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from benchmarks.quality import passkey_prompts

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion
from infokv_testing.transformers_reference import continue_after_eviction, keep_in_cache
from infokv_vllm.config import CompressionConfig
from infokv_vllm.scoring import SelectionInput, select_tokens
from infokv_vllm.signals import ATTENTION
from tests.test_signals_reference import window_attention_per_kv_head

pytestmark = pytest.mark.e2e

NEW_TOKENS = 10
CONFIGS = {method: CompressionConfig(method=method, budget=96, prefill_window=16, sinks=4)
           for method in ("snapkv", "rkv")}
CONFIG = CONFIGS["snapkv"]  # the budget, sinks and window every method here shares


def policy_reference(model, prompt_ids: list[int], method: str) -> tuple[torch.Tensor, list[int]]:
    """The kept token indices [layers, kv_heads, budget] and the greedy continuation."""
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache()
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True, output_attentions=True)
    length = len(prompt_ids)
    window = CONFIG.prefill_window
    attention = window_attention_per_kv_head(out.attentions, window, config.num_key_value_heads)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, kv_heads, length, head_size]
    request = SelectionInput("ref", len(out.attentions), config.num_key_value_heads, length, CONFIG.budget,
                             CONFIG.sinks, window, torch.device("cpu"), {ATTENTION: attention}, keys)
    keep = select_tokens(CONFIGS[method].policy.scores(request), CONFIG.budget, CONFIG.sinks, window)
    keep_in_cache(cache, keep)
    generated = [int(out.logits[0, -1].argmax())]
    while len(generated) < NEW_TOKENS:
        logits = continue_after_eviction(model, cache, torch.tensor([generated[-1]]), length + len(generated) - 1)
        generated.append(int(logits[-1].argmax()))
    return keep, generated


def batch_prompts(model_dir) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = {f"p{i}": tokenizer(prompt)["input_ids"] for i, (prompt, _) in enumerate(passkey_prompts(3, 6, 1))}
    assert all(len(ids) > CONFIG.budget + 40 for ids in prompts.values())  # a real share is evicted
    return prompts


def vllm_kept_sets(model_dir, prompts: dict[str, list[int]], method: str = "snapkv", **engine_overrides):
    """The tokens vLLM's policy keeps when it compresses each prompt of one batch, and its greedy answers."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    kept = {}
    with in_process_llm(model_dir, CONFIGS[method].to_settings(), **engine_overrides) as llm:
        policy = model_runner_of(llm).policy
        original = policy.scores

        def record_kept_set(request):  # vLLM suffixes request ids: "p0" -> "p0-1a2b3c4d"
            scores = original(request)
            kept[request.request_id.rsplit("-", 1)[0]] = select_tokens(scores, CONFIG.budget, CONFIG.sinks, request.window)
            return scores

        object.__setattr__(policy, "scores", record_kept_set)  # instrument the worker's policy (a frozen dataclass)
        answers = run_to_completion(llm, {rid: TokensPrompt(prompt_token_ids=ids) for rid, ids in prompts.items()},
                                    params)
    assert set(kept) == set(prompts), "every prompt is compressed once"
    return kept, answers


@pytest.mark.parametrize("method", list(CONFIGS))
def test_vllm_policy_matches_transformers_on_a_batch(smollm2_dir, method):
    from transformers import AutoModelForCausalLM

    prompts = batch_prompts(smollm2_dir)
    kept, answers = vllm_kept_sets(smollm2_dir, prompts, method)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager")
    identical = 0
    for rid, ids in prompts.items():
        reference_kept, reference_answer = policy_reference(model.eval(), ids, method)
        per_row = [len(set(a.tolist()) & set(b.tolist())) / CONFIG.budget
                   for a, b in zip(kept[rid].flatten(0, 1), reference_kept.flatten(0, 1))]
        assert min(per_row) >= 0.95 and sum(per_row) / len(per_row) >= 0.99, (rid, min(per_row))
        if torch.equal(kept[rid], reference_kept):
            identical += 1
            assert answers[rid] == reference_answer, rid
    assert identical >= 1, "no request kept exactly the reference set: the answer check never ran"
