"""Faults on purpose: a failure inside a compaction, aborts and preemptions at the compaction's step, SIGTERM under
load. Each must surface as a clear error or a clean exit within a bounded time, never a hang, wrong tokens or
leaked pages and per-request state."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
from vllm import SamplingParams

from infokv_testing.local_engine import in_process_llm, model_runner_of, run_to_completion, scheduler_of
from infokv_testing.local_server import EAGER, vllm_server_process
from tests.fault_injection.sitecustomize import FAULT_ENV
from tests.test_eviction_e2e import PROMPTS, SMALL_POOL, free_blocks

pytestmark = pytest.mark.e2e

GREEDY = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
STREAMING = {"method": "streaming", "budget": 64, "decode_interval": 32}
SERVE_FLAGS = ["--kv-compression", "streaming", "--kv-budget", "64", "--kv-decode-interval", "32", *EAGER]
FAULT_SURFACES_S = 30  # an injected fault reaches the client, and the server exits, within this
SIGTERM_DRAINS_S = 120  # eight streams of 160 tokens drain on 2 cores well within this
# Every Python process started with this directory first on its path imports its sitecustomize, which injects the
# fault where FAULT_ENV asks for it (the package itself has no fault switch).
FAULT_INJECTION_DIR = Path(__file__).parent / "fault_injection"


def assert_no_request_state(llm) -> None:
    """Every per-request piece of compression state, on the scheduler and on the worker, is empty."""
    llm.llm_engine.step()  # the step that hands the last finished requests to the worker (a server runs it too)
    assert not any(scheduler_of(llm).requests_held().values()), scheduler_of(llm).requests_held()
    assert not any(model_runner_of(llm).requests_held().values()), model_runner_of(llm).requests_held()


def watch_compactions(llm) -> list[str]:
    """Instrument the real scheduler: the ids of the requests it compacts, in order (the ids the caller gave:
    vLLM adds a suffix to each)."""
    scheduler, compacted = scheduler_of(llm), []
    original = scheduler._apply

    def recording(compaction, *args):
        compacted.append(compaction.request_id.rsplit("-", 1)[0])
        return original(compaction, *args)

    scheduler._apply = recording
    return compacted


@pytest.mark.parametrize("when", ["while its step runs", "after its step"])
def test_a_request_aborted_at_its_compaction_frees_every_page(smollm2_dir, when):
    """The abort lands while the step that compacts the request is in flight (vLLM frees its blocks before the
    worker moves them), or right after that step; the others finish as they would alone."""
    with in_process_llm(smollm2_dir, STREAMING, num_gpu_blocks_override=SMALL_POOL) as llm:
        alone = run_to_completion(llm, {"recipe": PROMPTS["recipe"]}, GREEDY)
        initial_free = free_blocks(llm)
        engine, scheduler = llm.llm_engine, scheduler_of(llm)
        compacted = watch_compactions(llm)

        def story_runs() -> bool:
            return any(request_id.startswith("story-") for request_id in scheduler.requests)

        if when == "while its step runs":
            schedule = scheduler.schedule

            def abort_story_once_compacted(*args, **kwargs):
                output = schedule(*args, **kwargs)
                if "story" in compacted and story_runs():
                    engine.abort_request(["story"])  # as a client's abort reaching the engine core now would
                return output

            scheduler.schedule = abort_story_once_compacted
        for request_id, prompt in PROMPTS.items():
            engine.add_request(request_id, prompt, GREEDY)
        finished = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = list(output.outputs[0].token_ids)
            if when == "after its step" and "story" in compacted and story_runs():
                engine.abort_request(["story"])
        assert compacted.count("story") >= 1
        assert finished["recipe"] == alone["recipe"]
        assert all(len(finished[request_id]) == GREEDY.max_tokens for request_id in ("recipe", "physics", "travel"))
        assert free_blocks(llm) == initial_free
        assert_no_request_state(llm)


def test_a_compressed_request_preempted_and_recomputed_finishes_with_exact_accounting(smollm2_dir):
    many = {f"{name}-{copy}": prompt for copy in range(3) for name, prompt in PROMPTS.items()}
    with in_process_llm(smollm2_dir, STREAMING, num_gpu_blocks_override=SMALL_POOL) as llm:
        initial_free = free_blocks(llm)
        scheduler = scheduler_of(llm)
        compacted, preempted = watch_compactions(llm), []
        original = scheduler._preempt_request

        def recording(request, *args, **kwargs):
            preempted.append(request.request_id)
            return original(request, *args, **kwargs)

        scheduler._preempt_request = recording
        outputs = run_to_completion(llm, many, GREEDY)
        assert sorted(outputs) == sorted(many) and all(len(t) == GREEDY.max_tokens for t in outputs.values())
        recomputed = [request_id for request_id in preempted if request_id.rsplit("-", 1)[0] in compacted]
        assert recomputed, "no compressed request was preempted"
        tokens = outputs[recomputed[0].rsplit("-", 1)[0]]
        assert llm.get_tokenizer().decode(tokens).strip()
        assert free_blocks(llm) == initial_free
        assert_no_request_state(llm)


def test_a_fault_inside_compaction_reaches_the_client_and_the_server_exits(smollm2_dir, tmp_path):
    """What docs/reliability.md promises: the request in flight gets vLLM's engine-dead error as HTTP 500
    within seconds, and `vllm serve` exits with status 1 (vLLM alone exits 0), so a supervisor sees the failure."""
    log_path = tmp_path / "serve.log"
    python_path = os.pathsep.join(filter(None, [str(FAULT_INJECTION_DIR), os.environ.get("PYTHONPATH")]))
    with vllm_server_process(smollm2_dir, SERVE_FLAGS, log_path,
                             env={FAULT_ENV: "compaction", "PYTHONPATH": python_path}) as (url, process):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=str(smollm2_dir), prompt=PROMPTS["story"], max_tokens=96,
                                      temperature=0)
        assert failed.value.status_code == 500, failed.value
        assert time.monotonic() - started < FAULT_SURFACES_S
        returncode = process.wait(timeout=FAULT_SURFACES_S)
    log = log_path.read_text()
    assert f"{FAULT_ENV}=compaction" in log, log[-3000:]
    assert returncode == 1, log[-3000:]


def test_sigterm_under_load_exits_cleanly(smollm2_dir, tmp_path):
    """SIGTERM to `vllm serve` (what a supervisor sends) with `--shutdown-timeout`: vLLM drains what is in flight,
    every stream ends, the server exits with status 0. (With vLLM's default of 0 it aborts the engine and may wait
    for the open streams indefinitely, with or without compression: docs/reliability.md.)"""
    log_path = tmp_path / "serve.log"
    flags = [*SERVE_FLAGS, "--shutdown-timeout", str(SIGTERM_DRAINS_S)]
    with vllm_server_process(smollm2_dir, flags, log_path) as (url, process):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        streaming = threading.Event()
        ended = []

        def stream(prompt: str) -> None:
            try:
                for _ in client.completions.create(model=str(smollm2_dir), prompt=prompt, max_tokens=160,
                                                   temperature=0, stream=True):
                    streaming.set()
            except openai.APIError as error:
                ended.append(type(error).__name__)
            else:
                ended.append("finished")

        threads = [threading.Thread(target=stream, args=(prompt,)) for prompt in [*PROMPTS.values()] * 2]
        for thread in threads:
            thread.start()
        assert streaming.wait(timeout=120)
        time.sleep(2)  # compactions in flight
        os.kill(process.pid, signal.SIGTERM)
        returncode = process.wait(timeout=SIGTERM_DRAINS_S)
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a client hung after the server stopped"
    assert ended == ["finished"] * len(threads)
    log = log_path.read_text()
    assert returncode == 0, log[-3000:]
    # vLLM logs its output handler's EngineDeadError while it stops the engine; no frame of ours may be in a trace.
    assert 'infokv_vllm/' not in log, log[-3000:]
