"""`vllm serve` with the plugin, the real SmolLM2 model and the `openai` client, on loopback."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from infokv_testing.local_server import CPU_SERVE_FLAGS, EAGER, vllm_cli, vllm_server
from infokv_vllm.metrics import METRIC_PREFIX

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "vllm-serve.log"


@pytest.fixture(scope="module")
def compressing_server(smollm2_dir, server_log):
    """Compiled (vLLM's default): no policy forces eager mode."""
    with vllm_server(smollm2_dir, ["--kv-compression", "infokv", "--kv-budget", "128"], server_log,
                     env={"VLLM_LOGGING_LEVEL": "DEBUG"}) as url:
        yield url


@pytest.fixture
def client(compressing_server):
    from openai import OpenAI

    return OpenAI(base_url=compressing_server + "/v1", api_key="unused")


def compression_metrics(url: str) -> dict[str, float]:
    """Our samples on vLLM's /metrics (one engine, so one sample per metric)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith(METRIC_PREFIX)}


def settled_metrics(url: str) -> dict[str, float]:
    """The metrics once no request runs: the frontend may record a request's last step after it has replied."""
    deadline = time.monotonic() + 30
    while (metrics := compression_metrics(url))[f"{METRIC_PREFIX}kv_compression_ratio"] != 1.0:
        assert time.monotonic() < deadline, f"no request runs, yet the ratio stays below 1: {metrics}"
        time.sleep(0.5)
    return metrics


def test_chat_completion(client, smollm2_dir):
    reply = client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION, max_tokens=30,
                                           temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 30


def test_fields_that_are_not_ours_pass_untouched(client, smollm2_dir, server_log):
    """vLLM's `kv_transfer_params` (KV connectors) and other extensions' `kv_*` arguments are not settings; one that
    looks like a misspelt setting is served, with a warning in the server's log."""
    reply = client.chat.completions.create(
        model=str(smollm2_dir), messages=QUESTION, max_tokens=30, temperature=0,
        extra_body={"kv_transfer_params": {"do_remote_decode": False}, "vllm_xargs": {"kv_budgte": 100}})
    assert "Paris" in reply.choices[0].message.content
    assert "vllm_xargs.kv_budgte is not a compression setting (did you mean kv_budget?)" in server_log.read_text()


def test_streaming_chat_completion(client, smollm2_dir):
    stream = client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION, max_tokens=30,
                                            temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 3 and "Paris" in "".join(pieces)


def test_metrics_and_debug_log_report_compression(client, compressing_server, server_log, smollm2_dir):
    prompt = LONG_PROMPT
    before = compression_metrics(compressing_server)
    stream = client.completions.create(model=str(smollm2_dir), prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True)
    for received, _ in enumerate(stream):
        if received == 8:  # mid-stream: the request holds its budget plus what it generated since
            running = compression_metrics(compressing_server)
    assert 0.1 < running[f"{METRIC_PREFIX}kv_compression_ratio"] < 0.5, running

    after = settled_metrics(compressing_server)

    def grew(name: str) -> float:
        return after[f"{METRIC_PREFIX}{name}_total"] - before.get(f"{METRIC_PREFIX}{name}_total", 0.0)

    assert grew("compression_events") == 1, after
    assert 600 - 128 <= grew("tokens_evicted") < 700 - 128, after
    assert grew("kv_blocks_freed") >= 1
    assert grew("scoring_seconds") > 0 and grew("compaction_seconds") > 0
    assert "infokv: request" in server_log.read_text() and "compressed" in server_log.read_text()


LONG_PROMPT = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 35  # ~600 tokens


@pytest.mark.parametrize(("vllm_xargs", "evicted"), [({"kv_compression": "none"}, (0, 0)),
                                                     ({"kv_budget": 400}, (600 - 400, 700 - 400)),
                                                     ({"kv_budget_ratio": 0.25}, (600 * 0.75, 700 * 0.75))])
def test_requests_set_their_own_budget_through_vllm_xargs(client, compressing_server, smollm2_dir, vllm_xargs,
                                                         evicted):
    before = settled_metrics(compressing_server)
    reply = client.completions.create(model=str(smollm2_dir), prompt=LONG_PROMPT, max_tokens=4, temperature=0,
                                      extra_body={"vllm_xargs": vllm_xargs})
    assert reply.usage.completion_tokens == 4
    after = settled_metrics(compressing_server)
    grew = after[f"{METRIC_PREFIX}tokens_evicted_total"] - before.get(f"{METRIC_PREFIX}tokens_evicted_total", 0)
    assert evicted[0] <= grew <= evicted[1], (vllm_xargs, grew)


@pytest.mark.parametrize(("vllm_xargs", "message"), [
    ({"kv_budget": 3}, "invalid vllm_xargs.kv_budget: 3 leaves no room to choose tokens"),
    ({"kv_budget": "many"}, "invalid vllm_xargs.kv_budget: 'many' is not an integer"),
    ({"kv_budget_ratio": 2}, "invalid vllm_xargs.kv_budget_ratio: 2.0 is outside (0, 1]"),
    ({"kv_compression": "snapkv"}, "invalid vllm_xargs.kv_compression: 'snapkv': a request may give 'none'"),
    ({"kv_budget": "inf"}, "invalid vllm_xargs.kv_budget: 'inf' is not an integer"),  # JSON carries no inf
    ({"kv_keep_prompt": [1]}, "invalid vllm_xargs.kv_keep_prompt: [1] is not true or false"),
])
def test_bad_per_request_settings_get_http_400_and_the_server_keeps_serving(client, smollm2_dir, vllm_xargs,
                                                                             message):
    from openai import BadRequestError

    # Streaming requests too: the refusal comes before the response starts, not inside a 200 stream.
    for create, content in ((client.completions.create, {"prompt": "Hello"}),
                            (client.chat.completions.create, {"messages": QUESTION})):
        for stream in (False, True):
            with pytest.raises(BadRequestError) as error:
                create(model=str(smollm2_dir), max_tokens=2, stream=stream, extra_body={"vllm_xargs": vllm_xargs},
                       **content)
            assert error.value.status_code == 400 and message in str(error.value), (stream, str(error.value))
    assert client.completions.create(model=str(smollm2_dir), prompt="Hello", max_tokens=2).usage.completion_tokens


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-compression", "bogus"], "argument --kv-compression: invalid choice: 'bogus'"),
        (["--kv-compression", "infokv", "--kv-budget", "100000"],
         "invalid --kv-budget: 100000 is not smaller than the context length"),
    ],
)
def test_bad_flags_stop_the_server_with_a_clear_message(smollm2_dir, flags, message):
    result = subprocess.run([*vllm_cli(), "serve", str(smollm2_dir), *CPU_SERVE_FLAGS, *flags],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_vllm_bench_throughput_takes_the_flags(smollm2_dir):
    """`vllm bench throughput` builds its engine from the same flags (offline, random prompts)."""
    command = [*vllm_cli(), "bench", "throughput", "--model", str(smollm2_dir), "--dataset-name", "random",
               "--random-input-len", "48", "--random-output-len", "96", "--num-prompts", "4",
               "--block-size", "32", "--kv-compression", "infokv", "--kv-budget", "40",
               "--kv-decode-interval", "16", "--kv-prefill-window", "16", *CPU_SERVE_FLAGS, *EAGER]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Throughput:" in result.stdout
    assert "infokv_vllm.core.scheduler.CompressingScheduler" in result.stdout + result.stderr
