"""vLLM's prefix caching with compression on (CPU, SmolLM2): reused prefixes give cold-run outputs, and no
compaction rewrites a block the prefix cache or another request may read."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams

from infokv_testing.local_engine import BLOCK_SIZE, in_process_llm, model_runner_of, scheduler_of

pytestmark = pytest.mark.e2e

COLOURS = ["red", "blue", "green", "amber", "violet", "grey", "white", "black"]
# About 1,000 tokens of facts the questions ask about: a shared system prompt or document.
PREFIX = "Inventory notes.\n" + "".join(
    f"Shelf {shelf}: the {COLOURS[shelf % 8]} box holds {(shelf * 37) % 90 + 10} marbles and "
    f"{(shelf * 11) % 7 + 1} keys.\n" for shelf in range(48))
QUESTIONS = {name: f"{PREFIX}\nQuestion: how many marbles are on shelf {shelf}? Answer:"
             for name, shelf in (("first", 3), ("second", 17), ("third", 40))}
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
UNCOMPRESSED = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, extra_args={"kv_compression": "none"})
INFOKV = {"method": "infokv", "budget": 128, "decode_interval": 16}
ENGINE = dict(max_model_len=2048)


def generate(llm, prompt: str, params: SamplingParams = GREEDY) -> tuple[list[int], int]:
    """Token ids and how many prompt tokens came from the prefix cache."""
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    return list(output.outputs[0].token_ids), output.num_cached_tokens


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


@pytest.fixture(scope="module")
def cold_outputs(smollm2_dir):
    """Every question on an engine without prefix caching, compressed, and the second one opted out."""
    with in_process_llm(smollm2_dir, INFOKV, enable_prefix_caching=False, **ENGINE) as llm:
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        outputs = {name: generate(llm, prompt)[0] for name, prompt in QUESTIONS.items()}
        yield {**outputs, "second uncompressed": generate(llm, QUESTIONS["second"], UNCOMPRESSED)[0]}


def test_requests_after_a_compressed_one_reuse_its_prefix_and_answer_as_cold(smollm2_dir, cold_outputs):
    with in_process_llm(smollm2_dir, INFOKV, **ENGINE) as llm:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # vLLM's default stays on
        scheduler = scheduler_of(llm)
        idle_free = free_blocks(llm)
        prefix_blocks = len(llm.get_tokenizer()(PREFIX).input_ids) // BLOCK_SIZE
        first, cached = generate(llm, QUESTIONS["first"])
        assert cached == 0 and scheduler.totals.events > 0  # compressed: 1,000 prompt tokens, budget 128
        assert first == cold_outputs["first"]
        for name in ("second", "third"):  # the third reads blocks the second has reused and compressed after
            events = scheduler.totals.events
            tokens, cached = generate(llm, QUESTIONS[name])
            assert cached >= prefix_blocks * BLOCK_SIZE
            assert scheduler.totals.events > events
            assert tokens == cold_outputs[name], name
        assert free_blocks(llm) == idle_free  # every page returns (cached blocks count as free, as in vLLM)
        assert scheduler.requests_held() == dict.fromkeys(scheduler.requests_held(), 0)


def test_blocks_shared_with_a_running_request_are_copied_not_rewritten(smollm2_dir, cold_outputs):
    """A compressed request shares its prompt's blocks with an opted-out one that reuses them while both run; its
    decode-time compactions must leave their bytes alone."""
    settings = {**INFOKV, "budget": 1100}  # the first request compacts only while it decodes
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    opted_out = UNCOMPRESSED.clone()
    opted_out.max_tokens = params.max_tokens
    with in_process_llm(smollm2_dir, settings, **ENGINE) as llm:
        engine, scheduler, runner = llm.llm_engine, scheduler_of(llm), model_runner_of(llm)
        blocks_of = scheduler.manager.req_to_blocks
        engine.add_request("compressed", QUESTIONS["first"], params)
        engine.step()  # its prompt
        engine.step()  # its first decode step: the prompt's blocks are hashed now that their KV exists
        engine.add_request("reader", QUESTIONS["second"], opted_out)
        engine.step()
        (compressed,) = (request_id for request_id in blocks_of if request_id.startswith("compressed-"))
        (reader,) = (request_id for request_id in blocks_of if request_id.startswith("reader-"))
        shared = [block.block_id for block in blocks_of[reader] if block in blocks_of[compressed]]
        assert len(shared) >= len(llm.get_tokenizer()(PREFIX).input_ids) // BLOCK_SIZE
        cache = runner.compactor.caches[0]
        before = cache[shared].clone()
        outputs, events_while_shared = {}, 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id] = list(output.outputs[0].token_ids)
            if "reader" not in outputs:
                events_while_shared = scheduler.totals.events
                assert torch.equal(cache[shared], before)
        assert events_while_shared > 0
        assert outputs["reader"][:UNCOMPRESSED.max_tokens] == cold_outputs["second uncompressed"]


def test_the_first_token_after_a_hit_keeps_the_entropy_a_cold_run_measures(smollm2_dir):
    """The hit skips the logits that token was drawn from; the cached block kept their entropy."""
    with in_process_llm(smollm2_dir, INFOKV, **ENGINE) as llm:
        engine, scheduler, runner = llm.llm_engine, scheduler_of(llm), model_runner_of(llm)
        generate(llm, QUESTIONS["first"])  # caches the prefix
        engine.add_request("hit", QUESTIONS["second"], GREEDY)
        engine.step()  # the prompt after the hit; the compaction comes with the next step
        (hit,) = scheduler.requests
        tokens = [llm.get_tokenizer()(QUESTIONS[name]).input_ids for name in ("first", "second")]
        shared = next(index for index, (a, b) in enumerate(zip(*tokens)) if a != b)
        first_computed = shared // BLOCK_SIZE * BLOCK_SIZE  # the hit: the shared prefix's whole blocks
        block = scheduler.manager.req_to_blocks[hit][first_computed // BLOCK_SIZE].block_id
        stored = float(runner.signals.planes["entropy"][0][block, 0, 0])
        engine.abort_request(["hit"])
        engine.step()
        assert llm.reset_prefix_cache()
        engine.add_request("cold", QUESTIONS["second"], GREEDY)
        engine.step()
        (cold,) = scheduler.requests
        block = scheduler.manager.req_to_blocks[cold][first_computed // BLOCK_SIZE].block_id
        measured = float(runner.signals.planes["entropy"][0][block, 0, 0])  # stored after the cold prefill
        assert stored == pytest.approx(measured, abs=1e-4)
        assert stored > 0
