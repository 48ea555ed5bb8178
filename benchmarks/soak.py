"""Reliability soak: a long mixed load through `vllm serve --kv-compression infokv`, then checks that the answers
are the answers and that nothing leaked.

One `vllm serve` (SmolLM2 float32, vLLM's default compilation, `--kv-budget 128 --kv-memory-pressure` and the
pool-wide mode `--kv-pool-target 0.5` unless `--pool-target 0`, prefix caching as vLLM's default, a KV pool
of 2,275 tokens, 100 MiB of SmolLM2, under `--max-model-len 4096`, or 2048 in the pool-wide mode; with `--tp 2` a random-weight tiny Llama, as
SmolLM2's 9 attention heads do not split over two ranks) is driven by `--concurrency` client threads for at least
`--minutes` and `--requests`: chat and completions, streaming or not, n = 1 or 2, the server's budget or a
request's own (`vllm_xargs`: budgets, ratios with a floor, keep-prompt, opt-outs), vLLM's own `kv_transfer_params`
(which must pass untouched), prompts that share a prefix, client aborts at a random chunk of a stream, and malformed or out-of-range inputs, each of which must get HTTP 400. A sampler records KV usage and
running requests (vLLM's `/metrics`) and the memory of the server's process tree every few seconds.

Afterwards:
- every 10th greedy request is replayed alone and must return the same tokens (token ids where the API returns
  them, the text of a stream). Requests compressed under memory pressure or for the pool target, or preempted,
  are left out first: the batch decides when those are compressed, by design; the server's debug log says which;
- KV usage and running requests are back to 0, and the plugin's per-request state is empty: the last "idle ...
  holds per-request state" debug lines of the scheduler and of every worker show only zeros;
- the memory of the server's processes grows by less than 2% over the second half of the load.
Results: `benchmarks/results/<name>.json` and a plot beside it (KV usage, running requests, memory over time).

    .venv/bin/python benchmarks/soak.py                          # >= 1,000 requests over >= 20 minutes
    .venv/bin/python benchmarks/soak.py --tp 2 --model tiny-llama --name soak-tp2   # two ranks, one core each
    .venv/bin/python benchmarks/soak.py --smoke
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

SENTENCES = ["The river runs past the old mill.", "Seven boats leave the harbour at dawn.",
             "A quiet library keeps its maps in the basement.", "The baker sells bread with figs on Tuesdays.",
             "Wind turns the blades of the tall white turbines.", "Her notebook lists forty kinds of beetles."]
QUESTIONS = ["Summarise the text in one sentence.", "What happens at dawn?", "Write a short poem about the mill.",
             "Continue the story.", "List three facts from the text."]
# Opens three in ten prompts (some 150 tokens): their first pages hit the prefix cache, so compressed requests
# copy or take over cached pages, and compactions meet pages other requests read.
SHARED_PREFIX = ("You are a careful assistant for a museum of maritime history. Answer plainly, cite the text you "
                 "are given, and say when it does not tell. " * 4)
# Inputs that must be refused with HTTP 400 while the server goes on serving the others.
BAD_INPUTS = [
    {"vllm_xargs": {"kv_budget": 3}},
    {"vllm_xargs": {"kv_budget_ratio": 1.5}},
    {"vllm_xargs": {"kv_budget": "many"}},
    {"vllm_xargs": {"kv_compression": "snapkv"}},
    {"vllm_xargs": {"kv_budget": "inf"}},
    {"vllm_xargs": {"kv_keep_prompt": [1]}},
    {"vllm_xargs": {"kv_compression": "none"}, "max_tokens": 4000},  # an opt-out that cannot fit the pool
    {"max_tokens": -1},
    {"temperature": -2.0},
]
IDLE_LINE = re.compile(r"^\((.*?)\).*infokv: idle (scheduler|worker) holds per-request state of (\{.*\})")
BATCH_DEPENDENT_LINE = re.compile(r"infokv: request (\S+) (?:compressed .*(?:memory pressure|pool target)|preempted after)")
# vLLM's own request fields, which compression must pass untouched (KV connectors read `kv_transfer_params`).
VLLM_FIELDS = {"kv_transfer_params": {"do_remote_decode": False}}


@dataclass
class Job:
    index: int
    chat: bool
    stream: bool
    n: int
    temperature: float
    max_tokens: int
    prompt: str
    xargs: dict | None
    abort_after: int | None = None  # stream chunks read before the client goes away
    bad: dict | None = None  # a malformed or out-of-range input: must get HTTP 400
    vllm_fields: bool = False  # carries VLLM_FIELDS

    @property
    def request_id(self) -> str:
        return f"soak-{self.index}"

    @property
    def greedy(self) -> bool:
        return self.bad is None and self.abort_after is None and self.n == 1 and self.temperature == 0


@dataclass
class Outcome:
    status: str  # ok, aborted, refused (HTTP 400), error
    tokens: list[int] | str | None = None  # token ids, or the text of a stream
    detail: str = ""


def make_job(index: int, rng: random.Random) -> Job:
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    n = 2 if rng.random() < 0.15 else 1
    prompt = " ".join(rng.choice(SENTENCES) for _ in range(rng.choice([4, 12, 40, 80]))) + " " + rng.choice(QUESTIONS)
    if rng.random() < 0.3:
        prompt = SHARED_PREFIX + prompt
    xargs = rng.choice([None, None, {"kv_budget": rng.choice([64, 96, 192, 256])},
                        {"kv_budget_ratio": rng.choice([0.3, 0.5]), "kv_budget": 64}, {"kv_keep_prompt": True},
                        {"kv_compression": "none"}])
    job = Job(index, chat, stream, n, 0.0 if n == 1 and rng.random() < 0.6 else 0.8, rng.choice([16, 48, 96, 288]),
              prompt, xargs)
    if stream and rng.random() < 0.15:
        job.abort_after = rng.randint(1, 40)
    if rng.random() < 0.05:
        job.bad = rng.choice(BAD_INPUTS)
    job.vllm_fields = rng.random() < 0.1
    return job


def send(client, model: str, job: Job) -> Outcome:
    import openai

    body = {"max_tokens": job.max_tokens, "temperature": job.temperature, "n": job.n, "seed": job.index,
            "return_token_ids": True, "vllm_xargs": job.xargs, **(VLLM_FIELDS if job.vllm_fields else {}),
            **(job.bad or {})}
    arguments = {key: body.pop(key) for key in ("max_tokens", "temperature", "n", "seed")}
    if job.chat:
        create, content = client.chat.completions.create, {"messages": [{"role": "user", "content": job.prompt}]}
    else:
        create, content = client.completions.create, {"prompt": job.prompt}
    try:
        reply = create(model=model, stream=job.stream, extra_body=body, **arguments, **content,
                       extra_headers={"X-Request-Id": job.request_id})
        if job.stream:
            texts = []
            for received, chunk in enumerate(reply):
                if job.abort_after is not None and received >= job.abort_after:
                    reply.response.close()  # the client goes away mid-stream
                    return Outcome("aborted")
                if chunk.choices:
                    delta = chunk.choices[0].delta.content if job.chat else chunk.choices[0].text
                    texts.append(delta or "")
            return Outcome("ok", "".join(texts))
        token_ids = reply.choices[0].model_extra.get("token_ids")
        if not token_ids:  # nothing to compare a replay with
            return Outcome("error", detail="the reply carries no token ids")
        return Outcome("ok", list(token_ids))
    except openai.BadRequestError as error:
        return Outcome("refused", detail=str(error)[:200])
    except openai.APIError as error:
        cause = f" ({error.__cause__!r})" if error.__cause__ is not None else ""  # e.g. the connection's error
        return Outcome("error", detail=f"{type(error).__name__}: {str(error)[:300]}{cause[:300]}")


def scrape(url: str) -> dict[str, float]:
    """vLLM's /metrics as name -> value (summed over label sets)."""
    values: dict[str, float] = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                name = name.split("{")[0]
                values[name] = values.get(name, 0.0) + float(value)
    return values


def rss_by_process(pid: int) -> dict[str, float]:
    """MiB resident per process of the server's tree, by title (vLLM names its processes, e.g.
    `VLLM::EngineCore`), so a report says which one grows."""
    import psutil

    root = psutil.Process(pid)
    sizes: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(process.cmdline()[:1]) or process.name()
            sizes[f"{title} ({process.pid})"] = process.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return sizes


def sample_forever(url: str, pid: int, started: float, samples: list[dict], stop: threading.Event) -> None:
    while not stop.wait(3.0):
        try:
            metrics = scrape(url)
        except OSError:
            continue
        processes = rss_by_process(pid)
        samples.append({"t": time.monotonic() - started, "kv_usage": metrics.get("vllm:kv_cache_usage_perc", 0.0),
                        "running": metrics.get("vllm:num_requests_running", 0.0),
                        "waiting": metrics.get("vllm:num_requests_waiting", 0.0),
                        "rss_mib": sum(processes.values()), "rss_mib_by_process": processes})


def idle_state(log: str) -> dict[str, dict]:
    """The last idle line of the scheduler and of each worker, by process ("worker (EngineCore pid=12)")."""
    last: dict[str, dict] = {}
    for line in log.splitlines():
        match = IDLE_LINE.search(line)
        if match:
            last[f"{match.group(2)} ({match.group(1)})"] = ast.literal_eval(match.group(3))
    return last


def growth_by_process(samples: list[dict]) -> dict[str, float]:
    """Each process's largest RSS over its first, within `samples`."""
    first: dict[str, float] = {}
    peak: dict[str, float] = {}
    for sample in samples:
        for name, mib in sample["rss_mib_by_process"].items():
            first.setdefault(name, mib)
            peak[name] = max(peak.get(name, mib), mib)
    return {name: round(peak[name] / first[name] - 1, 4) for name in first}


@dataclass
class Report:
    requests: int
    minutes: float
    outcomes: dict[str, int]
    errors: list[str]
    refused_bad_inputs: int
    bad_inputs: int
    bad_inputs_served: list[int]  # bad inputs that were not refused
    good_inputs_refused: list[str]  # valid requests refused (HTTP 400), with the reason
    replayed: int
    replay_mismatches: list[int]
    replay_skipped_batch_dependent: int
    final_kv_usage: float
    final_running: float
    idle_state: dict[str, dict]
    leaked_state: bool
    rss_growth_second_half: float
    rss_growth_second_half_by_process: dict[str, float]
    compression_events: float
    samples: list[dict] = field(repr=False)


def main() -> None:
    from report import figure_with_axes, save_figure, write_report  # beside this script (benchmarks run as files)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a minute of load: checks the script runs")
    parser.add_argument("--minutes", type=float, default=20.0, help="load for at least this long")
    parser.add_argument("--requests", type=int, default=1000, help="and at least this many requests")
    parser.add_argument("--concurrency", type=int, default=24, help="client threads")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (CPU: one core each)")
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny-llama"),
                        help="SmolLM2-135M (its 9 attention heads do not split over 2 ranks), or a random-weight "
                             "tiny Llama with SmolLM2's tokenizer (4 query / 2 KV heads) for --tp 2")
    parser.add_argument("--pool-tokens", type=int, default=None,
                        help="the KV pool in tokens, below --max-model-len 4096: 2,275 (100 MiB of SmolLM2); 2,700 for "
                             "the tiny Llama, in which vLLM's start-up check finds 1,920 tokens of room for 2,275 "
                             "tokens' bytes, under the 2,048 the pool-wide mode needs")
    parser.add_argument("--pool-target", type=float, default=0.5,
                        help="the pool-wide mode's share of the KV pool (--kv-pool-target); 0: per-request budgets")
    parser.add_argument("--replay-every", type=int, default=10,
                        help="replay every this-many greedy requests that the batch did not decide")
    parser.add_argument("--allocator", default="glibc", choices=("glibc", "tcmalloc"),
                        help="the server's malloc: glibc's, or tcmalloc preloaded as vLLM's CPU platform preloads the "
                             "copy its official wheels bundle (here Debian's libtcmalloc-minimal4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.requests, args.concurrency, args.replay_every = 0.5, 40, 8, 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx
    from openai import OpenAI

    from infokv_testing.local_server import EAGER, vllm_server_process
    from infokv_testing.models import cache_dir
    from infokv_testing.random_models import SHAPES, write_random_llama
    from infokv_testing.smollm2 import ensure_model

    model = ensure_model()
    if args.model == "tiny-llama":
        target = cache_dir() / "tiny-llama-random"
        if not (target / "model.safetensors.index.json").exists():
            # Weights large enough (std 0.1) that greedy outputs vary with the context, as the tests' tiny Llama.
            write_random_llama(SHAPES["tiny"], model, target, dtype="float32", std=0.1)
        model = target
    elif args.tp > 1:
        parser.error("SmolLM2-135M's 9 attention heads do not split over several ranks: add --model tiny-llama")
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # float32 keys and values, each rank holding its share of the KV heads
    token_bytes = config["num_hidden_layers"] * config["num_key_value_heads"] // args.tp * head_dim * 2 * 4
    # The pool-wide mode does not bound a request's KV, so vLLM's start-up check wants a whole context in the pool.
    max_model_len = 2048 if args.pool_target else 4096
    args.pool_tokens = args.pool_tokens or (2700 if args.model == "tiny-llama" else 2275)
    flags = ["--dtype", "float32", "--kv-cache-memory-bytes", str(args.pool_tokens * token_bytes), "--max-model-len",
             str(max_model_len), "--kv-compression", "infokv", "--kv-budget", "128", "--kv-memory-pressure",
             *(["--kv-pool-target", str(args.pool_target)] if args.pool_target else []),
             "--tensor-parallel-size", str(args.tp), *(EAGER if args.smoke else [])]
    env = {"VLLM_LOGGING_LEVEL": "DEBUG", **({"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if args.tp == 2 else {})}
    if args.allocator == "tcmalloc":
        found = sorted(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4"))
        if not found:
            parser.error("--allocator tcmalloc: no libtcmalloc_minimal.so.4 (apt-get install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = str(found[0])
    rng = random.Random(args.seed)
    jobs: list[Job] = []
    outcomes: dict[int, Outcome] = {}
    samples: list[dict] = []
    # The server's log stays after the run (its path is in the report): the place to look into any error.
    log_path = Path(tempfile.mkdtemp(prefix=f"{args.name}-")) / "serve.log"
    with vllm_server_process(model, flags, log_path, base_flags=[], env=env) as (url, process):
        # Client-side failures would count against the engine: both end as "Server disconnected without sending a
        # response" with no access-log line. One connection per request: a kept-alive connection that uvicorn closes
        # after 5 idle seconds can fail just as a thread sends on it. One client per thread: httpcore 1.0.9's shared
        # pool can close a connection it has just handed to another thread (encode/httpcore#1110).
        def new_client() -> OpenAI:
            return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600,
                          http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)))

        started = time.monotonic()
        stop = threading.Event()
        sampler = threading.Thread(target=sample_forever, args=(url, process.pid, started, samples, stop))
        sampler.start()
        lock = threading.Lock()

        def next_job() -> Job | None:
            with lock:
                if time.monotonic() - started >= args.minutes * 60 and len(jobs) >= args.requests:
                    return None
                jobs.append(make_job(len(jobs), rng))
                return jobs[-1]

        def worker() -> None:
            client = new_client()
            while (job := next_job()) is not None:
                outcomes[job.index] = send(client, str(model), job)

        with ThreadPoolExecutor(args.concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(args.concurrency)]:
                future.result()
        load_minutes = (time.monotonic() - started) / 60
        time.sleep(10)  # aborted streams end; the idle lines are logged
        stop.set()
        sampler.join()
        final = scrape(url)
        log = log_path.read_text()
        batch_dependent = {match.group(1) for match in map(BATCH_DEPENDENT_LINE.search, log.splitlines()) if match}
        greedy = [job for job in jobs if job.greedy and outcomes[job.index].status == "ok"]
        eligible = [job for job in greedy
                    if not any(f"-{job.request_id}-" in request_id for request_id in batch_dependent)]
        replay = eligible[::args.replay_every]
        client = new_client()
        mismatches = [job.index for job in replay
                      if send(client, str(model), Job(**{**asdict(job), "index": job.index + 10**6})).tokens
                      != outcomes[job.index].tokens]
        log = log_path.read_text()

    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    bad = [job for job in jobs if job.bad is not None]
    second_half = [sample for sample in samples if sample["t"] >= load_minutes * 30]
    half = [sample["rss_mib"] for sample in second_half]
    state = idle_state(log)
    report = Report(
        requests=len(jobs), minutes=load_minutes, outcomes=counts,
        errors=[f"{index}: {outcome.detail}" for index, outcome in outcomes.items() if outcome.status == "error"],
        refused_bad_inputs=sum(outcomes[job.index].status == "refused" for job in bad), bad_inputs=len(bad),
        bad_inputs_served=[job.index for job in bad if outcomes[job.index].status != "refused"],
        good_inputs_refused=[f"{job.index}: {outcomes[job.index].detail}" for job in jobs
                             if job.bad is None and outcomes[job.index].status == "refused"],
        replayed=len(replay), replay_mismatches=mismatches,
        replay_skipped_batch_dependent=len(greedy) - len(eligible),
        final_kv_usage=final.get("vllm:kv_cache_usage_perc", -1.0),
        final_running=final.get("vllm:num_requests_running", -1.0), idle_state=state,
        leaked_state=not state or any(any(sizes.values()) for sizes in state.values()),
        rss_growth_second_half=(max(half) / half[0] - 1) if len(half) > 1 else 0.0,
        rss_growth_second_half_by_process=growth_by_process(second_half),
        compression_events=final.get("infokv:compression_events_total", 0.0), samples=samples)
    path = write_report(args.name, args.smoke, tp=args.tp, settings=vars(args), server_log=str(log_path),
                        **asdict(report))
    figure, (kv_axis, running_axis, rss_axis) = figure_with_axes(3, (15, 4))
    minutes = [sample["t"] / 60 for sample in samples]
    for axis, key, label in ((kv_axis, "kv_usage", "KV cache usage"), (running_axis, "running", "running requests"),
                             (rss_axis, "rss_mib", "server RSS (MiB)")):
        axis.plot(minutes, [sample[key] for sample in samples])
        axis.set_xlabel("minutes")
        axis.set_title(label)
    save_figure(figure, path.with_suffix(".png"))
    print(f"{report.requests} requests in {report.minutes:.1f} min: {counts}; bad inputs refused "
          f"{report.refused_bad_inputs}/{report.bad_inputs}, valid requests refused {len(report.good_inputs_refused)} "
          f"{report.good_inputs_refused[:3]}; replay mismatches {len(mismatches)}/{len(replay)} "
          f"({report.replay_skipped_batch_dependent} batch-dependent left out); final KV usage "
          f"{report.final_kv_usage}, running {report.final_running}; idle state {state}; RSS growth over the "
          f"second half {report.rss_growth_second_half:.2%} (by process: {report.rss_growth_second_half_by_process}); "
          f"compressions {report.compression_events:.0f}")


if __name__ == "__main__":
    import checkout_root  # noqa: F401 (infokv_testing, from the checkout's root)
    main()
