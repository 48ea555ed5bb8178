"""A real vLLM engine in this process (engine core and worker in-process), so tests and benchmarks can watch
its scheduler and model runner."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from infokv_vllm.config import ADDITIONAL_CONFIG_KEY

BLOCK_SIZE = 32  # the smallest block vLLM's CPU attention takes: compaction frees pages sooner


@contextlib.contextmanager
def in_process_llm(model: Path, compression: dict | None = None, **overrides) -> Iterator:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    # A fixed KV size (11k tokens of SmolLM2 in float32) rather than a share of the NUMA node, which vLLM refuses
    # when other processes hold memory; it leaves room for a transformers model beside the engine.
    kwargs = dict(dtype="float32", kv_cache_memory_bytes=512 * 2**20, max_model_len=512, enforce_eager=True,
                  block_size=BLOCK_SIZE, seed=0)
    kwargs.update(overrides)
    llm = LLM(str(model), additional_config={ADDITIONAL_CONFIG_KEY: compression} if compression else {},
              **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def run_to_completion(llm, prompts: dict[str, str], params, after_step: Callable[[], None] = lambda: None
                      ) -> dict[str, list[int]]:
    """Step the engine until every request finishes; returns generated token ids by request id. `params`: one
    SamplingParams for every request, or a dict of them by request id."""
    engine = llm.llm_engine
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params[request_id] if isinstance(params, dict) else params)
    finished: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        after_step()
    return finished


def count_preemptions(llm) -> list[int]:
    """Instrument the real scheduler: a one-element list that counts `_preempt_request` calls."""
    scheduler = scheduler_of(llm)
    count = [0]
    original = scheduler._preempt_request

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counting
    return count


def model_runner_of(llm):
    """The worker's model runner (in this process: the engine runs the uni-process executor)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
