"""Models whose layers are not all full attention, through the real CPU engine: tiny random Gemma 3 and gpt-oss (a
sliding-window layer, then a full-attention one; gpt-oss's with attention sinks and routed experts) and Qwen3-Next
(a Gated DeltaNet linear-attention layer, then a full-attention one). vLLM gives each kind its own KV cache group;
compression takes the full-attention group and leaves the sliding-window or state group to vLLM's manager, which
must behave as without it.

The batch and settings are the model-family tests' (`tests/test_model_families_e2e.py`): each prompt opted out,
with a budget above its length, and with the server's small budget, compressed by infokv (all three signals)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from vllm.model_executor.layers.attention.attention import Attention
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from infokv_testing.local_engine import BLOCK_SIZE, in_process_llm, model_runner_of, scheduler_of
from infokv_vllm.metrics import METRIC_PREFIX
from infokv_vllm.signals import ATTENTION
from tests.test_model_families_e2e import BATCH, BUDGET, INTERVAL, LONG, MAX_TOKENS, PARAMS, PROMPTS, SETTINGS, \
    FamilyRun, by_variant, check_nothing_held_once_idle, compressed_run
from tests.test_signals_reference import WINDOW, check_token_entropy, window_attention_per_kv_head

pytestmark = pytest.mark.e2e



@dataclass(frozen=True)
class Family:
    left_to_vllm: str  # vLLM's manager of the group compression leaves alone
    dtype: str = "float32"  # vLLM's CPU Gated DeltaNet takes bfloat16 only
    # the window attention's tolerance against transformers (float32): bfloat16 rounds the logits
    tolerance: tuple[float, float] = (1e-3, 1e-4)
    attentions_index: int = 1  # the full-attention layer's among transformers' attentions (Qwen3-Next returns
    # its full-attention layers' only)


FAMILIES = {"gemma3": Family("SlidingWindowManager"), "gpt_oss": Family("SlidingWindowManager"),
            "qwen3_next": Family("MambaManager", "bfloat16", (5e-2, 2e-2), attentions_index=0)}
PROMPT_TOKENS = {"fox": 111, "count": 97, "sea": 6}
# Room for the whole batch uncompressed in both groups, so that neither engine preempts and their steps align.
ENGINE = dict(max_model_len=256, num_gpu_blocks_override=160)


@dataclass
class HybridRun:
    compressed: FamilyRun | None = None
    # per request, the pages it held in the groups left to vLLM after each step, with and without compression
    left_to_vllm: dict[str, list[int]] = field(default_factory=dict)
    vanilla_left_to_vllm: dict[str, list[int]] = field(default_factory=dict)
    block_size: int = 0  # the full-attention group's (vLLM raises it to a state page's size beside Mamba layers)
    vanilla: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    group_kinds: list[str] = field(default_factory=list)
    cache_hits: dict[str, int] = field(default_factory=dict)  # request -> prompt tokens the prefix cache gave it
    # per attention layer call: (compressed layer?, its metadata's seq_lens, vLLM's shared seq_lens, the rows'
    # evicted tokens), by step
    lengths: list[list[tuple[bool, list[int], list[int], list[int]]]] = field(default_factory=lambda: [[]])


def run_in_two_waves(llm, after_step) -> dict[str, dict[str, list[int]]]:
    """The small-budget requests first, then, once their prompts are computed (and hashed: compression hashes a
    block once its KV is computed, before the first compaction, vanilla vLLM when it schedules it), the others,
    which find those prompts' pages in the prefix cache with compression or without. The first wave's window
    attention covers its whole observation window (a hit's tokens are not computed again)."""
    engine, finished = llm.llm_engine, {}

    def add(first_wave: bool) -> None:
        for request_id, prompt in BATCH.items():
            if request_id.endswith(".small") == first_wave:
                engine.add_request(request_id, prompt, PARAMS[request_id])

    def step() -> None:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        after_step()

    add(True)
    for _ in range(2):  # the prompts' step, and under asynchronous scheduling the one that sees it finish
        step()
    add(False)
    while engine.has_unfinished_requests():
        step()
    return by_variant(finished)


def watch_attention_lengths(runner, lengths: list[list]) -> None:
    """Record, for every attention layer's call, the KV lengths its metadata gives each batch row, beside vLLM's
    shared lengths and the tokens each row's request has evicted."""
    compressed = set(runner.kv_cache_config.kv_cache_groups[runner._group].layer_names)
    for name, layer in runner.compilation_config.static_forward_context.items():
        if not isinstance(layer, Attention):
            continue
        impl = layer.impl

        def recording(*args, forward=impl.forward, name=name, **kwargs):
            metadata = args[5] if len(args) > 5 else kwargs["attn_metadata"]
            if metadata is not None:
                count = metadata.seq_lens.shape[0]
                lengths[-1].append((name in compressed, metadata.seq_lens.tolist(), runner.seq_lens[:count].tolist(),
                                    [runner.evicted.get(request_id, 0)
                                     for request_id in runner.input_batch.req_ids[:count]]))
            return forward(*args, **kwargs)

        impl.forward = recording


def watch_cache_hits(scheduler, hits: dict[str, int]) -> None:
    manager = scheduler.kv_cache_manager
    find = manager.get_computed_blocks

    def finding(request):
        found = find(request)  # (blocks, tokens computed, ...)
        hits[request.request_id.split("-")[0]] = found[1]
        return found

    manager.get_computed_blocks = finding


def pages_left_to_vllm(scheduler, held: dict[str, list[int]]):
    """After each step: the pages (not the null block) each request holds in the groups compression leaves to
    vLLM (all but full attention, whose manager is ours where compression is on)."""
    others = [manager for manager in scheduler.kv_cache_manager.coordinator.single_type_managers
              if not isinstance(manager, FullAttentionManager)]

    def record() -> None:
        for manager in others:
            for request_id, blocks in manager.req_to_blocks.items():
                held.setdefault(request_id.split("-")[0], []).append(sum(not block.is_null for block in blocks))
    return record


@pytest.fixture(scope="module", params=list(FAMILIES))
def hybrid_run(request) -> HybridRun:
    family = request.param
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    engine = dict(ENGINE, dtype=FAMILIES[family].dtype)
    with in_process_llm(model_dir, SETTINGS, **engine) as llm:
        scheduler = scheduler_of(llm)
        run = HybridRun(block_size=scheduler.manager.block_size,
                        group_kinds=[type(manager).__name__ for manager in
                                     scheduler.kv_cache_manager.coordinator.single_type_managers])
        watch_cache_hits(scheduler, run.cache_hits)
        watch_attention_lengths(model_runner_of(llm), run.lengths)
        left = pages_left_to_vllm(scheduler, run.left_to_vllm)

        def after_step() -> None:
            run.lengths.append([])
            left()

        run.compressed = compressed_run(llm, family, run_in_two_waves, after_step)
    with in_process_llm(model_dir, **engine) as llm:
        run.vanilla = run_in_two_waves(llm, pages_left_to_vllm(scheduler_of(llm), run.vanilla_left_to_vllm))
    return run


def test_the_full_attention_group_is_compressed_and_the_other_left_to_vllm(hybrid_run):
    assert hybrid_run.group_kinds == [FAMILIES[hybrid_run.compressed.family].left_to_vllm,
                                      "CompactingAttentionManager"]
    run, block_size = hybrid_run.compressed, hybrid_run.block_size
    assert set(run.scored) == {f"{name}.small" for name in PROMPTS}
    assert run.events == len(run.scored) >= len(LONG) * 2 + 1
    assert run.layers_checked == {0} and not run.misplaced, run.misplaced  # the compactor's one layer
    for attention in run.attention:
        assert attention.shape[:2] == (1, 2)  # [compressed layers, KV heads]
        assert (attention.sum(-1) > 0).all()
    for name in LONG:
        # The opted-out request grows to its whole length; the compressed one holds its whole prompt once.
        assert max(run.held[f"{name}.none"]) == cdiv(PROMPT_TOKENS[name] + MAX_TOKENS - 1, block_size)
        assert max(run.held[f"{name}.small"]) == cdiv(PROMPT_TOKENS[name], block_size)
    assert run.blocks_freed >= sum(cdiv(PROMPT_TOKENS[name], block_size) - cdiv(BUDGET, block_size)
                                   for name in LONG) > 0
    for name in PROMPTS:
        assert max(run.held[f"{name}.small"][1:]) <= cdiv(BUDGET + INTERVAL, block_size) + 1
    check_nothing_held_once_idle(run)


def test_only_the_compressed_group_reads_kept_lengths(hybrid_run):
    """In every step the full-attention layer's metadata has each request's kept length (logical minus evicted);
    vLLM's shared seq_lens, which a sliding-window layer reads (as its metadata shows) to place its window and a
    linear-attention layer its state, stay logical."""
    shifted_steps = 0
    for calls in filter(None, hybrid_run.lengths):
        assert sum(compressed for compressed, *_ in calls) == 1, "one full-attention layer call per step"
        for compressed, lengths, shared, evicted in calls:
            assert lengths == ([length - shift for length, shift in zip(shared, evicted)] if compressed else shared)
        shifted_steps += any(any(evicted) for *_, evicted in calls)
    assert shifted_steps > MAX_TOKENS // 2, "most steps run requests that evicted tokens"


def test_the_group_left_to_vllm_holds_what_it_holds_without_compression(hybrid_run):
    assert hybrid_run.left_to_vllm == hybrid_run.vanilla_left_to_vllm
    if FAMILIES[hybrid_run.compressed.family].left_to_vllm == "SlidingWindowManager":
        # The window (16 tokens) lets vLLM free the long prompts' early sliding-window pages.
        assert all(min(hybrid_run.left_to_vllm[f"{name}.small"]) < cdiv(PROMPT_TOKENS[name], BLOCK_SIZE)
                   for name in LONG)


def test_prefix_caching_serves_the_repeated_prompts(hybrid_run):
    """Each long prompt comes three times (small budget, then opted out and roomy): vLLM's prefix caching, on by
    default, serves the later ones the compressed one's whole pages (hashed before its first compaction) in both
    groups, and their outputs still equal vanilla's (below)."""
    for name in LONG:
        for variant in ("none", "roomy"):
            # vLLM computes a prompt's last token again: the whole pages before it
            block_size = hybrid_run.block_size
            assert hybrid_run.cache_hits[f"{name}.{variant}"] == (PROMPT_TOKENS[name] - 1) // block_size * block_size


def test_budgets_above_the_length_and_opting_out_answer_as_a_vanilla_engine(hybrid_run):
    run, vanilla = hybrid_run.compressed, hybrid_run.vanilla
    assert all(len(tokens) == MAX_TOKENS for outputs in run.outputs.values() for tokens in outputs.values())
    for variant in ("none", "roomy"):
        assert run.outputs[variant] == vanilla[variant] == vanilla["small"], variant
    assert run.outputs["small"] != vanilla["small"], "compression changes the outputs, so the comparison above " \
                                                     "can fail"


def test_the_prompt_signals_equal_transformers(hybrid_run, request):
    """The window attention of the full-attention layer and the token entropy of each long prompt's compaction
    equal those of the transformers implementation (float32) on the same prompt; in bfloat16, within its rounding
    (the entropy's top-k of rounded logits is not compared)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = hybrid_run.compressed.family
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for name in LONG:
        with torch.no_grad():
            outputs = model(tokenizer(PROMPTS[name], return_tensors="pt").input_ids, output_attentions=True)
        signals = hybrid_run.compressed.prompt_signals[f"{name}.small"]
        reference = window_attention_per_kv_head(outputs.attentions, WINDOW, model.config.num_key_value_heads)
        rtol, atol = FAMILIES[family].tolerance
        torch.testing.assert_close(signals[ATTENTION], reference[[FAMILIES[family].attentions_index]], rtol=rtol,
                                   atol=atol)
        if FAMILIES[family].dtype == "float32":
            check_token_entropy(signals, (model.config, outputs))


def test_vllm_serve_compresses_a_sliding_window_model_with_sinks(tiny_gpt_oss_dir, tmp_path):
    """`vllm serve MODEL --kv-compression infokv` on gpt-oss's shape: a completion is compressed (the metrics count
    it, pages freed), a completion opted out answers as before, and a bad per-request budget is refused (HTTP 400)
    while the server goes on."""
    import httpx

    from infokv_testing.local_server import EAGER, vllm_server
    from tests.test_serve_e2e import settled_metrics

    flags = ["--kv-compression", "infokv", "--kv-budget", str(BUDGET), "--kv-decode-interval", str(INTERVAL),
             "--max-model-len", "256", "--block-size", str(BLOCK_SIZE), *EAGER]
    base = ["--dtype", "float32", "--kv-cache-memory-bytes", "1G"]
    with vllm_server(tiny_gpt_oss_dir, flags, tmp_path / "serve.log", base_flags=base) as url:
        def complete(**extra) -> httpx.Response:
            return httpx.post(url + "/v1/completions", timeout=120, json={
                "model": str(tiny_gpt_oss_dir), "prompt": PROMPTS["fox"], "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, **extra})

        compressed = complete()
        opted_out = complete(vllm_xargs={"kv_compression": "none"})
        assert compressed.status_code == opted_out.status_code == 200
        assert compressed.json()["choices"][0]["text"] != opted_out.json()["choices"][0]["text"]
        refused = complete(vllm_xargs={"kv_budget": 3})
        assert refused.status_code == 400 and "kv_budget" in refused.text
        metrics = settled_metrics(url)
        assert metrics[f"{METRIC_PREFIX}compression_events_total"] >= 2
        assert metrics[f"{METRIC_PREFIX}kv_blocks_freed_total"] >= 1
