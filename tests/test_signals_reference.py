"""The signals vLLM records for scoring equal a straightforward transformers computation on the same prompt:
window attention (SnapKV-style), top-k token entropy and representation evolution."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion
from infokv_vllm.signals import ATTENTION, ENTROPY, REPRESENTATION
from infokv_vllm.signals.entropy import topk_entropy

pytestmark = pytest.mark.e2e

WINDOW, TOP_K = 16, 10
PROMPT = ("A lighthouse keeper named Ada kept a logbook of every ship that passed her island. On Monday she saw "
          "a fishing boat called Marigold, on Tuesday a cargo ship named Orion, and on Wednesday a small yacht "
          "whose sails were painted blue. The question is: which ship passed on Tuesday? Answer:")


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]


def prompt_compression_signals(smollm2_dir, prompt_ids, chunk_tokens: int | None,
                               prepare=lambda llm: None) -> dict[str, torch.Tensor]:
    """The signals the InfoKV policy receives when vLLM compresses the prompt, prefilled in one step or in
    chunks of `chunk_tokens`; `prepare(llm)` may instrument the engine first."""
    chunking = {} if chunk_tokens is None else {"max_num_batched_tokens": chunk_tokens,
                                                "enable_chunked_prefill": True}
    compression = {"method": "infokv", "budget": len(prompt_ids) - 20, "prefill_window": WINDOW,
                   "decode_window": 8, "entropy_top_k": TOP_K}
    captured = []
    with in_process_llm(smollm2_dir, compression, **chunking) as llm:
        policy = model_runner_of(llm).policy
        original = policy.scores

        def capture(request):
            captured.append({name: signal.clone() for name, signal in request.signals.items()})
            return original(request)

        object.__setattr__(policy, "scores", capture)  # instrument the worker's policy (a frozen dataclass)
        prepare(llm)
        run_to_completion(llm, {"q": TokensPrompt(prompt_token_ids=prompt_ids)},
                          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(captured) == 1, "the prompt is compressed exactly once"
    return captured[0]


@pytest.fixture(scope="module", params=[None, 24], ids=["one-chunk", "chunked-prefill"])
def vllm_signals(request, smollm2_dir, prompt_ids) -> dict[str, torch.Tensor]:
    """In 24-token chunks the window and the entropies (each chunk's last one waits for its token) cross chunk
    boundaries."""
    return prompt_compression_signals(smollm2_dir, prompt_ids, request.param)


@pytest.fixture(scope="module")
def transformers_outputs(smollm2_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        outputs = model(torch.tensor([prompt_ids]), output_attentions=True, output_hidden_states=True)
    return model.config, outputs


def window_attention_per_kv_head(attentions, window: int, num_kv_heads: int) -> torch.Tensor:
    """[layers, kv_heads, T]: from transformers' attention probabilities ([1, q_heads, T, T] per layer), the mass
    the last `window` queries give each token, summed over those queries and the query heads of each KV head."""
    reference = []
    for weights in attentions:
        mass = weights[0, :, -window:, :].sum(dim=1)  # [q_heads, T]
        reference.append(mass.view(num_kv_heads, -1, mass.shape[-1]).sum(dim=1))
    return torch.stack(reference)


def check_window_attention(signals, transformers_outputs) -> None:
    config, outputs = transformers_outputs
    reference = window_attention_per_kv_head(outputs.attentions, WINDOW, config.num_key_value_heads)
    torch.testing.assert_close(signals[ATTENTION], reference, rtol=1e-3, atol=1e-4)


def check_token_entropy(signals, transformers_outputs) -> None:
    _, outputs = transformers_outputs
    per_position = topk_entropy(outputs.logits[0], TOP_K)  # entropy of the distribution of the *next* token
    expected = torch.cat([torch.zeros(1), per_position[:-1]])
    ours = signals[ENTROPY]
    assert (ours == ours[:1, :1]).all(), "token entropy is the same in every layer and head"
    torch.testing.assert_close(ours[0, 0], expected, rtol=1e-3, atol=1e-4)


def check_representation_evolution(signals, transformers_outputs) -> None:
    _, outputs = transformers_outputs
    states = outputs.hidden_states  # input of each decoder layer; the last one is after the final norm
    expected = torch.stack([1 - torch.nn.functional.cosine_similarity(states[layer][0], states[layer + 1][0], dim=-1)
                            for layer in range(len(states) - 2)])
    ours = signals[REPRESENTATION][: len(expected), 0]
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-4)


def test_window_attention_matches_transformers(vllm_signals, transformers_outputs):
    check_window_attention(vllm_signals, transformers_outputs)


def test_token_entropy_matches_transformers(vllm_signals, transformers_outputs):
    check_token_entropy(vllm_signals, transformers_outputs)


def test_representation_evolution_matches_transformers(vllm_signals, transformers_outputs):
    check_representation_evolution(vllm_signals, transformers_outputs)
