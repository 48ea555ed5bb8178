"""With compression off (no `--kv-compression`, the default), the installed plugin leaves vLLM as it is: the same
tokens and log-probabilities as vLLM without any plugin, no admission rule of ours, vLLM's KV connectors working,
and no compression series on `/metrics`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from infokv_testing.local_server import EAGER, vllm_server
from infokv_vllm.metrics import METRIC_PREFIX

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# vLLM's own field for KV connectors, and settings that would be ours were compression on (even invalid ones).
NOT_OURS_WHEN_OFF = {"kv_transfer_params": {"do_remote_decode": False},
                     "vllm_xargs": {"kv_budget": 3, "kv_compression": "snapkv", "kv_keep_prompt": [1]}}


@pytest.fixture(scope="module")
def connector_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv-store")


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inert") / "vllm-serve.log"


@pytest.fixture(scope="module")
def plain_server(smollm2_dir, connector_store, server_log):
    """No compression flag, vLLM's example KV connector (it saves each prompt's KV to disk, loads it back on a
    later hit), which compression refuses, and --disable-log-stats, which a stat-logger plugin would override."""
    connector = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"shared_storage_path": str(connector_store)}}
    flags = ["--kv-transfer-config", json.dumps(connector), "--disable-log-stats", *EAGER]
    with vllm_server(smollm2_dir, flags, server_log) as url:
        yield url


def test_requests_with_vllm_fields_and_our_keys_are_vllm_alone(plain_server, smollm2_dir, connector_store,
                                                               server_log):
    from openai import OpenAI

    client = OpenAI(base_url=plain_server + "/v1", api_key="unused")

    def ask(extra_body: dict) -> str:
        return client.chat.completions.create(model=str(smollm2_dir), messages=QUESTION, max_tokens=12,
                                              temperature=0, extra_body=extra_body).choices[0].message.content

    plain = ask({})
    assert "Paris" in plain
    assert ask(NOT_OURS_WHEN_OFF) == plain  # no HTTP 400, and nothing changes the request's fate
    assert list(connector_store.rglob("*.safetensors")), "the KV connector saved nothing"
    assert "External Cache Hit" in server_log.read_text()
    with urllib.request.urlopen(plain_server + "/metrics", timeout=10) as response:
        assert METRIC_PREFIX not in response.read().decode()
    assert "CompressingScheduler" not in server_log.read_text()
    assert "custom stat loggers were found" not in server_log.read_text()  # vLLM collects no stats


GREEDY_LOGPROBS = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory_bytes=1 << 28, max_model_len=1024, enforce_eager=True)
prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
outputs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, logprobs=2))
print("RESULT" + json.dumps([[(token, sorted((k, round(v.logprob, 6)) for k, v in top.items()))
                              for token, top in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                             for o in outputs]))
"""


def greedy_logprobs(model: Path, plugins: str | None) -> list:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    result = subprocess.run([sys.executable, "-c", GREEDY_LOGPROBS, str(model)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    return json.loads(line.removeprefix("RESULT"))


def test_offline_generation_equals_vllm_without_the_plugin(smollm2_dir):
    with_plugin_off = greedy_logprobs(smollm2_dir, plugins=None)  # every installed plugin loads, ours included
    without_plugin = greedy_logprobs(smollm2_dir, plugins="no-such-plugin")  # vLLM loads no general plugin
    assert with_plugin_off == without_plugin
