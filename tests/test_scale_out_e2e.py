"""Scaling out with compression on CPU: data parallelism (`vllm serve --data-parallel-size 2`, each rank its own
engine core behind vLLM's load balancer) and tensor parallelism across two Ray nodes (a head and a worker raylet on
this machine, loopback only), each against one in-process engine with the same settings."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm import SamplingParams

from infokv_testing.local_engine import BLOCK_SIZE, in_process_llm, run_to_completion
from infokv_testing.local_server import EAGER, vllm_server
from infokv_vllm.metrics import METRIC_PREFIX
from tests.test_tensor_parallel_e2e import PARAMS, PROMPTS, SETTINGS, generate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parent.parent

# Long prompts with no page in common (no prefix-cache hit), so the load balancer's choice of rank cannot change
# what a request computes; each rank gets two, and at least one it compresses.
DP_PROMPTS = {"fox": "The quick brown fox jumps over the lazy dog. " * 8,
              "count": "One two three four five six seven. " * 9,
              "sea": "Waves roll onto the sand while gulls circle above the harbour. " * 6,
              "road": "A long road winds through hills, fields and quiet villages at dusk. " * 6}
# Per-request settings (vllm_xargs): a budget of its own, and an opted-out request.
DP_XARGS = {"count": {"kv_budget": 64}, "road": {"kv_compression": "none"}}
DP_SERVER_FLAGS = [*EAGER, "--block-size", str(BLOCK_SIZE), "--kv-compression", SETTINGS["method"],
                   *(f"--kv-{name.replace('_', '-')}={value}" for name, value in SETTINGS.items() if name != "method")]


def _metric_samples(url: str) -> dict[tuple[str, str], float]:
    """(sample name, engine) -> value, for our samples and vLLM's KV-cache usage."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, sample.labels.get("engine", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith(METRIC_PREFIX) or sample.name == "vllm:kv_cache_usage_perc"}


def _complete(url: str, model: Path, name: str, vllm_xargs: dict | None = None) -> list[int]:
    body = {"model": str(model), "prompt": DP_PROMPTS[name], "max_tokens": PARAMS.max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "vllm_xargs": vllm_xargs or DP_XARGS.get(name, {})}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["token_ids"]


def test_data_parallel_ranks_compress_like_one_engine(tiny_llama_dir, tmp_path):
    """Two engine cores behind vLLM's default two API servers: the greedy outputs equal one engine's with the same
    server and per-request settings, both API servers refuse a setting compression cannot serve, both ranks
    compress (their own `engine` label on /metrics), and every page returns on both."""
    params = {name: SamplingParams(temperature=0, max_tokens=PARAMS.max_tokens, ignore_eos=True,
                                   extra_args=DP_XARGS.get(name)) for name in DP_PROMPTS}
    with in_process_llm(tiny_llama_dir, SETTINGS, max_model_len=256) as llm:
        one_engine = run_to_completion(llm, DP_PROMPTS, params)
    log = tmp_path / "vllm-serve-dp.log"
    with vllm_server(tiny_llama_dir, [*DP_SERVER_FLAGS, "--data-parallel-size", "2"], log,
                     env={"VLLM_LOGGING_LEVEL": "DEBUG"},
                     base_flags=["--dtype", "float32", "--kv-cache-memory-bytes", "64M", "--max-model-len", "256"]
                     ) as url:
        with ThreadPoolExecutor(len(DP_PROMPTS)) as pool:
            served = dict(zip(DP_PROMPTS, pool.map(lambda name: _complete(url, tiny_llama_dir, name), DP_PROMPTS)))
        for _ in range(2):  # each API server admits: a setting compression cannot serve is refused by both
            with pytest.raises(urllib.error.HTTPError) as refused:
                _complete(url, tiny_llama_dir, "fox", {"kv_budget": 3})
            assert refused.value.code == 400 and "vllm_xargs.kv_budget: 3" in refused.value.read().decode()
        deadline = time.monotonic() + 30  # the frontend may record a rank's last step after it has replied
        while True:
            metrics = _metric_samples(url)
            if not any(value for (name, _), value in metrics.items() if name == "vllm:kv_cache_usage_perc"):
                break
            assert time.monotonic() < deadline, f"pages still held after every request finished: {metrics}"
            time.sleep(0.5)
    assert served == one_engine
    events = {engine: metrics[(f"{METRIC_PREFIX}compression_events_total", engine)] for engine in ("0", "1")}
    assert all(count >= 1 for count in events.values()), events
    text = log.read_text()
    ranks_compressing = set(re.findall(r"EngineCore_DP(\d) pid=\d+\) DEBUG .* infokv: request \S+ compressed", text))
    assert ranks_compressing == {"0", "1"}


@pytest.fixture
def two_ray_nodes(monkeypatch):
    """A Ray head and a worker node on this machine, one CPU each, bound to loopback and started by the test; the
    driver (this process, where the engine core runs) joins it. Every Ray process it started is stopped after."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    # Ray resolves a loopback cluster address to the host's address before connecting (a cluster is meant to be
    # reachable from other machines), and this one listens on loopback only; its switch for machines where
    # clusters are unsupported keeps loopback.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"head": 1}})
    try:
        cluster.add_node(**node, resources={"worker": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = [node for node in ray.nodes() if node["Alive"]]
        assert len(nodes) == 2 and {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.usefixtures("two_ray_nodes")
def test_tensor_parallel_ranks_on_two_ray_nodes_compress_like_one_process(tiny_llama_dir, monkeypatch):
    """Each node has one CPU, so vLLM's placement group (one CPU bundle per rank) puts one rank on each."""
    import ray
    from vllm.v1.executor import ray_utils

    one_process, events = generate(tiny_llama_dir, SETTINGS, 1)
    nodes_of_ranks = []
    verify_bundles = ray_utils._verify_bundles

    def recording_nodes(placement_group, *args, **kwargs):
        nodes_of_ranks.extend(ray.util.placement_group_table(placement_group)["bundles_to_node_id"].values())
        return verify_bundles(placement_group, *args, **kwargs)

    monkeypatch.setattr(ray_utils, "_verify_bundles", recording_nodes)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert generate(tiny_llama_dir, SETTINGS, 2, "ray") == (one_process, events)
    assert len(nodes_of_ranks) == 2 and len(set(nodes_of_ranks)) == 2, nodes_of_ranks
    assert ray.available_resources().get("CPU") == 2, "the engine's placement group was removed"
