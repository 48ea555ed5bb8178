"""Model families beyond Llama, checked through the real CPU engine rather than assumed: tiny random Qwen3 (q/k
norm, heads * head size above the hidden size), Qwen3-MoE and Mixtral (routed experts), compressed by infokv,
the policy that records all three signals, which equal a transformers computation on the same model.

One compressing engine per family serves one batch: each prompt three times, opted out (`kv_compression: none`),
with its own budget above its whole length, and with the server's small budget; then an engine with compression
off serves the same batch, the vanilla reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from vllm import SamplingParams
from vllm.utils.math_utils import cdiv

from infokv_testing.local_engine import BLOCK_SIZE, in_process_llm, model_runner_of, run_to_completion, scheduler_of
from infokv_vllm.signals import ATTENTION
from tests.test_signals_reference import (
    TOP_K,
    WINDOW,
    check_representation_evolution,
    check_token_entropy,
    check_window_attention,
)

pytestmark = pytest.mark.e2e

FAMILIES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# Two prompts of 4 pages (97 and 111 tokens), compressed to the budget's 2 after prefill; one of 6 tokens, compressed
# only once it outgrows the budget while decoding.
PROMPTS = {"fox": "The quick brown fox jumps over the lazy dog. " * 11,
           "count": "One two three four five six seven. " * 12,
           "sea": "Tell me about the sea."}
LONG = ("fox", "count")
BUDGET, INTERVAL, MAX_TOKENS = 48, 16, 64
SETTINGS = {"method": "infokv", "budget": BUDGET, "decode_interval": INTERVAL, "prefill_window": WINDOW,
            "decode_window": 8, "entropy_top_k": TOP_K}
VARIANTS = {"none": {"kv_compression": "none"}, "roomy": {"kv_budget": 200}, "small": {}}
BATCH = {f"{name}.{variant}": prompt for variant in VARIANTS for name, prompt in PROMPTS.items()}
PARAMS = {request_id: SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                     extra_args=VARIANTS[request_id.split(".")[1]]) for request_id in BATCH}
ENGINE = dict(max_model_len=256, num_gpu_blocks_override=64)


def by_variant(outputs: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    grouped: dict[str, dict[str, list[int]]] = {}
    for request_id, tokens in outputs.items():
        name, variant = request_id.split(".")
        grouped.setdefault(variant, {})[name] = tokens
    return grouped


@dataclass
class FamilyRun:
    """What one compressing engine did with the batch."""

    family: str
    architecture: str  # the model class vLLM built
    outputs: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # variant -> prompt -> token ids
    scored: list[str] = field(default_factory=list)  # request id of every compaction the policy scored
    attention: list[torch.Tensor] = field(default_factory=list)  # its attention signal, [layers, kv_heads, slots]
    prompt_signals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # request id -> signals
    misplaced: list[str] = field(default_factory=list)  # compactions whose pages do not hold the kept KV
    layers_checked: set[int] = field(default_factory=set)  # layers whose pages the compaction check read
    events: int = 0
    blocks_freed: int = 0
    held: dict[str, list[int]] = field(default_factory=dict)  # request -> pages it held after each step
    free_blocks: tuple[int, int] = (0, 0)  # idle, before and after the batch
    held_idle: dict[str, dict[str, int]] = field(default_factory=dict)  # per-request state once idle


def watch_compactions(llm, run: FamilyRun) -> None:
    """Instrument the worker: what the policy scored with, and whether each compaction leaves in every layer's
    and KV head's leading slots exactly the keys and values it chose to keep."""
    runner = model_runner_of(llm)
    policy, compactor = runner.policy, runner.compactor
    scores, compact = policy.scores, compactor.compact

    def scoring(request):
        request_id = request.request_id.split("-")[0]
        run.scored.append(request_id)
        run.attention.append(request.signals[ATTENTION].clone())
        if not request.decoding:
            run.prompt_signals[request_id] = {name: signal.clone() for name, signal in request.signals.items()}
        return scores(request)

    def compacting(block_ids, keep):
        held = len(block_ids) * compactor.block_size
        before = [compactor.read(block_ids, held, values) for values in (False, True)]
        compact(block_ids, keep)
        for values, planes in zip((False, True), before):
            expected = planes.gather(2, keep[..., None].to(planes.device).expand(-1, -1, -1, planes.shape[-1]))
            after = compactor.read(block_ids, keep.shape[-1], values)
            for layer in range(after.shape[0]):
                run.layers_checked.add(layer)
                if not torch.equal(after[layer], expected[layer]):
                    run.misplaced.append(f"layer {layer} {'values' if values else 'keys'}")

    object.__setattr__(policy, "scores", scoring)  # a frozen dataclass
    compactor.compact = compacting


def serve_batch(llm, after_step: Callable[[], None]) -> dict[str, dict[str, list[int]]]:
    """The batch at once; the outputs by variant."""
    return by_variant(run_to_completion(llm, BATCH, PARAMS, after_step=after_step))


def compressed_run(llm, family: str, serve=serve_batch, after_step: Callable[[], None] = lambda: None) -> FamilyRun:
    """What a compressing engine does with the batch, served by `serve(llm, after_step)`: each compaction (watched),
    the compressed group's pages each request holds after every step (then `after_step`), and, once idle, the free
    pages and the per-request state left."""
    scheduler, runner = scheduler_of(llm), model_runner_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    run = FamilyRun(family, type(runner.get_model()).__name__)
    watch_compactions(llm, run)
    idle_free = pool.get_num_free_blocks()

    def watch_pages() -> None:
        for request_id, blocks in scheduler.manager.req_to_blocks.items():
            run.held.setdefault(request_id.split("-")[0], []).append(len(blocks))
        after_step()

    run.outputs = serve(llm, watch_pages)
    run.events, run.blocks_freed = scheduler.totals.events, scheduler.totals.blocks_freed
    # The workers hear that the last requests finished with the next step, which runs no model.
    llm.llm_engine.step()
    run.free_blocks = (idle_free, pool.get_num_free_blocks())
    run.held_idle = {"scheduler": scheduler.requests_held(), "worker": runner.requests_held()}
    return run


def check_nothing_held_once_idle(run: FamilyRun) -> None:
    """Every page returns, and no per-request state is left on the scheduler or the worker."""
    idle_free, after_free = run.free_blocks
    assert after_free == idle_free
    assert run.held_idle["scheduler"] == dict.fromkeys(run.held_idle["scheduler"], 0), run.held_idle
    assert run.held_idle["worker"] == dict.fromkeys(run.held_idle["worker"], 0), run.held_idle


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request) -> FamilyRun:
    family = request.param
    with in_process_llm(request.getfixturevalue(f"tiny_{family}_dir"), SETTINGS, **ENGINE) as llm:
        return compressed_run(llm, family)  # the engine is shut down after: the vanilla test starts its own


def test_vllm_builds_the_family(family_run):
    assert family_run.architecture == FAMILIES[family_run.family]


def test_a_small_budget_compacts_every_layer_and_every_page_returns(family_run):
    run = family_run
    assert all(len(tokens) == MAX_TOKENS for outputs in run.outputs.values() for tokens in outputs.values())
    # Only the small-budget requests are compressed: the long prompts after prefill and while decoding, the short
    # one once it outgrows the budget.
    assert set(run.scored) == {f"{name}.small" for name in PROMPTS}
    assert run.events == len(run.scored) >= len(LONG) * 2 + 1
    assert run.layers_checked == {0, 1} and not run.misplaced, run.misplaced
    assert run.blocks_freed >= len(LONG) * 2  # each long prompt: 4 pages down to 2 after prefill
    for name in LONG:
        assert run.held[f"{name}.none"][0] == run.held[f"{name}.small"][0] == 4  # the prompt's step
    for name in PROMPTS:  # decoding, as every step after a long prompt's
        assert max(run.held[f"{name}.small"][1:]) <= cdiv(BUDGET + INTERVAL, BLOCK_SIZE) + 1
    check_nothing_held_once_idle(run)


def test_the_attention_signal_records_on_every_attention_layer(family_run):
    for attention in family_run.attention:
        assert attention.shape[:2] == (2, 2)  # [layers, KV heads]
        assert torch.isfinite(attention).all() and (attention >= 0).all()
        assert (attention.sum(-1) > 0).all(), attention.sum(-1)


def test_the_prompt_signals_equal_transformers(family_run, request):
    """The signals of each long prompt's compaction (window attention, token entropy, representation evolution)
    equal those of the family's transformers implementation on the same prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{family_run.family}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert sorted(family_run.prompt_signals) == sorted(f"{name}.small" for name in LONG)
    for name in LONG:
        with torch.no_grad():
            outputs = model(tokenizer(PROMPTS[name], return_tensors="pt").input_ids, output_attentions=True,
                            output_hidden_states=True)
        signals = family_run.prompt_signals[f"{name}.small"]
        check_window_attention(signals, (model.config, outputs))
        check_token_entropy(signals, (model.config, outputs))
        check_representation_evolution(signals, (model.config, outputs))


def test_budgets_above_the_length_and_opting_out_answer_as_a_vanilla_engine(family_run, request):
    """The same batch with compression off, where the per-request settings are not read: every request runs
    uncompressed."""
    with in_process_llm(request.getfixturevalue(f"tiny_{family_run.family}_dir"), **ENGINE) as llm:
        vanilla = by_variant(run_to_completion(llm, BATCH, PARAMS))
    for variant in ("none", "roomy"):
        assert family_run.outputs[variant] == vanilla[variant] == vanilla["small"], variant
    assert family_run.outputs["small"] != vanilla["small"], "compression changes the outputs, so the comparison " \
                                                            "above can fail"
