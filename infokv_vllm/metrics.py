"""Prometheus metrics for compression, served on vLLM's own `/metrics`.

The scheduler (engine-core process) counts what compression does; vLLM's frontend serves `/metrics`. The counts
cross over inside vLLM's per-step `SchedulerStats`, extended by one field (`CompressionSchedulerStats`; the
decoder learns of it in `vllm_internals.patches.stats_decoding`), and are turned into metrics by
`CompressionStatLogger`, which `vllm_internals.patches.stat_loggers` adds to vLLM's stat loggers for engines that
compress (an entry point would load it for every engine).

With several API servers (`vllm serve --api-server-count N`, which data parallelism defaults to its size), vLLM
serves `/metrics` from every API-server process through prometheus_client's multiprocess mode, and an engine's
stats reach whichever API server its step's first output belongs to. Each process then sees the same engine's
cumulative totals at different times, and multiprocess counters are summed over processes: so there the totals
are published as gauges of the same sample names, merged by their largest value, and the gauges by their most
recent one (vLLM's choice for its own per-engine gauges).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge
from vllm.v1.metrics.loggers import AggregateStatLoggerBase
from vllm.v1.metrics.stats import SchedulerStats

METRIC_PREFIX = "infokv:"  # not "vllm:": vLLM unregisters every "vllm:" collector when it builds its own logger
# Pool-wide mode: upper edges of the attention share one compaction evicts, for its distribution (`le` labels)
ATTENTION_LOST_EDGES = (0.001, 0.01, 0.05, 0.1, 0.25, 1.0)


@dataclass
class CompressionStats:
    """One engine's compression since start-up (counters), and the KV its running requests hold now (gauges).

    Counters are cumulative, not per step: vLLM may build several `SchedulerStats` in a step and deliver one.
    """

    events: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0
    seconds_scoring: float = 0.0  # on the reporting worker: choosing tokens, and recording signals after the forward
    seconds_compacting: float = 0.0  # on the reporting worker: moving KV and signals within the pages
    # Pool-wide mode: the share of observed attention its compactions evicted, summed over compactions, and per
    # `ATTENTION_LOST_EDGES` edge the compactions that evicted at most that share (cumulative, as Prometheus' le)
    attention_lost: float = 0.0
    attention_lost_counts: tuple[int, ...] = (0,) * len(ATTENTION_LOST_EDGES)
    kept_tokens_per_request: tuple[int, ...] = ()  # the compressed running requests' KV tokens, now

    def count_attention_lost(self, share: float) -> None:
        self.attention_lost += share
        self.attention_lost_counts = tuple(count + (share <= edge) for count, edge in
                                           zip(self.attention_lost_counts, ATTENTION_LOST_EDGES))
    kept_tokens: int = 0  # KV tokens the running requests hold
    logical_tokens: int = 0  # tokens the running requests have computed


@dataclass
class CompressionSchedulerStats(SchedulerStats):
    compression: CompressionStats | None = None

    @classmethod
    def extend(cls, stats: SchedulerStats, compression: CompressionStats) -> CompressionSchedulerStats:
        fields = {field.name: getattr(stats, field.name) for field in dataclasses.fields(SchedulerStats)}
        return cls(**fields, compression=compression)


class CompressionStatLogger(AggregateStatLoggerBase):
    """Publishes `CompressionStats` as Prometheus metrics labelled like vLLM's (model_name, engine)."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        _unregister_previous_engines_metrics()
        engine_indexes = engine_indexes or [0]
        labels = {index: [vllm_config.model_config.served_model_name, str(index)] for index in engine_indexes}

        # prometheus_client's own switch to its multiprocess mode (vLLM sets it for several API servers)
        self._totals_as_gauges = "PROMETHEUS_MULTIPROC_DIR" in os.environ

        def total(name: str, documentation: str, labelnames: list[str]):
            if self._totals_as_gauges:
                return Gauge(name + "_total", documentation, labelnames=labelnames, multiprocess_mode="max")
            return Counter(name, documentation, labelnames=labelnames)

        def gauge(name: str, documentation: str, labelnames: list[str]) -> Gauge:
            return Gauge(name, documentation, labelnames=labelnames, multiprocess_mode="mostrecent")

        def per_engine(make_metric, name: str, documentation: str) -> dict:
            metric = make_metric(METRIC_PREFIX + name, documentation, ["model_name", "engine"])
            return {index: metric.labels(*values) for index, values in labels.items()}

        self._counters = {
            "events": per_engine(total, "compression_events", "KV compressions of a request."),
            "tokens_evicted": per_engine(total, "tokens_evicted", "KV tokens evicted (per layer and KV head)."),
            "blocks_freed": per_engine(total, "kv_blocks_freed", "KV cache pages freed by compression."),
            "seconds_scoring": per_engine(total, "scoring_seconds",
                                          "Time spent choosing tokens to keep and recording per-slot signals "
                                          "after the forward."),
            "seconds_compacting": per_engine(total, "compaction_seconds",
                                             "Time spent moving kept KV and signals within the pages."),
            "attention_lost": per_engine(total, "pool_attention_lost",
                                         "Pool-wide mode: share of each compacted request's observed attention "
                                         "its compaction evicted, summed over compactions."),
        }
        lost = total(METRIC_PREFIX + "pool_compactions_by_attention_lost", "Pool-wide mode: compactions that "
                     "evicted at most the share `le` of the request's observed attention.",
                     ["model_name", "engine", "le"])
        self._lost_by_edge = {index: [lost.labels(*values, str(edge)) for edge in ATTENTION_LOST_EDGES]
                              for index, values in labels.items()}
        kept = gauge(METRIC_PREFIX + "request_kv_tokens", "KV tokens the compressed running requests hold: the "
                     "least, the median and the most.", ["model_name", "engine", "stat"])
        self._kept = {index: {stat: kept.labels(*values, stat) for stat in ("min", "median", "max")}
                      for index, values in labels.items()}
        self._ratio = per_engine(gauge, "kv_compression_ratio",
                                 "KV tokens held by running requests / tokens they have computed (1: none evicted).")
        self._last = {index: CompressionStats() for index in engine_indexes}

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        stats: CompressionStats | None = getattr(scheduler_stats, "compression", None)
        if stats is None:
            return
        last = self._last[engine_idx]
        for name, counter in self._counters.items():
            self._advance(counter[engine_idx], getattr(stats, name), getattr(last, name))
        for counter, now, before in zip(self._lost_by_edge[engine_idx], stats.attention_lost_counts,
                                        last.attention_lost_counts):
            self._advance(counter, now, before)
        kept = sorted(stats.kept_tokens_per_request) or [0]
        for stat, value in (("min", kept[0]), ("median", kept[len(kept) // 2]), ("max", kept[-1])):
            self._kept[engine_idx][stat].set(value)
        self._ratio[engine_idx].set(stats.kept_tokens / stats.logical_tokens if stats.logical_tokens else 1.0)
        self._last[engine_idx] = stats

    def _advance(self, metric, total: float, last_total: float) -> None:
        """Bring a total's metric to the engine's cumulative `total`, `last_total` being what this process saw
        before."""
        if self._totals_as_gauges:
            metric.set(total)
        else:
            metric.inc(total - last_total)

    def log_engine_initialized(self) -> None:
        pass


def _unregister_previous_engines_metrics() -> None:
    """A process that builds a second engine (tests, notebooks) would otherwise register the metrics twice."""
    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith(METRIC_PREFIX) for name in names):
            REGISTRY.unregister(collector)
