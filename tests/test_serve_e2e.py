"""`vllm serve` with the plugin, the real SmolLM2 model and the `openai` client, on loopback."""

from __future__ import annotations

import os
import subprocess

import pytest

from infokv_vllm.local_server import CPU_SERVE_FLAGS, vllm_cli, vllm_server

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def compressing_server(smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with vllm_server(smollm2_dir, ["--kv-compression", "infokv", "--kv-budget", "128"], log) as url:
        yield url


@pytest.fixture
def client(compressing_server):
    from openai import OpenAI

    return OpenAI(base_url=compressing_server + "/v1", api_key="unused")


def test_chat_completion(client, smollm2_dir):
    reply = client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION, max_tokens=30,
                                           temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 30


def test_streaming_chat_completion(client, smollm2_dir):
    stream = client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION, max_tokens=30,
                                            temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 3 and "Paris" in "".join(pieces)


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
               "--kv-decode-interval", "16", "--kv-prefill-window", "16", *CPU_SERVE_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Throughput:" in result.stdout
    assert "infokv_vllm.kv.scheduler.CompressingScheduler" in result.stdout + result.stderr
