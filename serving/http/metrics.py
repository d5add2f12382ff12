"""Prometheus metrics of the HTTP service, in a registry per app (never the process-global one)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

UNKNOWN_TASK = "_unknown"  # label for requests naming no loaded task, so clients cannot grow the label set
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_RECOVERY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ServiceMetrics:
    """Requests and latency per task and status; batch shape; queue depth; model-process crashes and
    restarts and hangs. `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("increlora_requests", "Model requests answered, by route, task and HTTP status.",
                                ["route", "task", "status"], registry=r)
        self.latency = Histogram("increlora_request_latency_seconds",
                                 "Model request latency (queueing included), by route, task and HTTP status.",
                                 ["route", "task", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram("increlora_batch_size_requests", "Requests merged into one model call.",
                                        buckets=_COUNT_BUCKETS, registry=r)
        self.batch_rows = Histogram("increlora_batch_rows", "Rows (inputs) per model call.",
                                    buckets=_COUNT_BUCKETS, registry=r)
        self.batch_tasks = Histogram("increlora_batch_tasks", "Distinct tasks per model call.",
                                     buckets=_COUNT_BUCKETS, registry=r)
        self.batch_seconds = Histogram("increlora_batch_duration_seconds", "Time the model spends on one batch.",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("increlora_queue_depth", "Requests waiting for the model.", registry=r)
        self.tasks_loaded = Gauge("increlora_tasks_loaded", "Adapters loaded in the bank.", registry=r)
        self.model_crashes = Counter("increlora_model_crashes", "Model processes that ended unasked.", registry=r)
        self.model_hangs = Counter("increlora_model_hangs", "Model processes killed because they hung (no heartbeat, "
                                   "or a call past its deadline); each is a crash too.", registry=r)
        self.model_restarts = Counter("increlora_model_restarts",
                                      "Model processes started again after a crash, serving.", registry=r)
        self.model_recovery = Histogram("increlora_model_recovery_seconds",
                                        "From a model process's end to its successor serving.",
                                        buckets=_RECOVERY_BUCKETS, registry=r)
        self.model_up = Gauge("increlora_model_up", "1 while the model process serves, else 0.", registry=r)

    def observe_request(self, task: str, status: int, seconds: float, route: str = "/v1/predict") -> None:
        self.requests.labels(route, task, str(status)).inc()
        self.latency.labels(route, task, str(status)).observe(seconds)

    def observe_batch(self, requests: int, rows: int, tasks: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_tasks.observe(tasks)
        self.batch_seconds.observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def observe_crash(self) -> None:
        self.model_crashes.inc()
        self.model_up.set(0)

    def observe_recovery(self, seconds: float) -> None:
        self.model_restarts.inc()
        self.model_recovery.observe(seconds)
        self.model_up.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_residency(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        """Report a bank's residency (tasks held, loads, evictions, hits, misses) read at each scrape."""
        self.registry.register(ResidencyCollector(stats))


class ResidencyCollector:
    """The metrics of a bank that loads tasks on first use, from its residency_stats() (kept in the bank,
    which may be another process); nothing while the bank cannot answer."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # names known only once the bank answers: registering must not call it

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:  # the model process restarting: the scrape still answers
            return
        if not s:
            return
        yield GaugeMetricFamily("increlora_tasks_held", "Tasks whose adapters the bank holds.", value=s["held"])
        yield GaugeMetricFamily("increlora_tasks_held_bytes", "Bytes of the held adapters' tensors.",
                                value=s["held_bytes"])
        yield GaugeMetricFamily("increlora_tasks_pinned", "Tasks pinned (never evicted).", value=len(s["pinned"]))
        yield CounterMetricFamily("increlora_task_loads", "Adapters loaded on first use.", value=s["loads"])
        yield CounterMetricFamily("increlora_task_evictions", "Held adapters evicted, least recently used first.",
                                  value=s["evictions"])
        yield CounterMetricFamily("increlora_task_load_failures", "Adapter folders that failed to load.",
                                  value=s["load_failures"])
        buckets = [(str(b), n) for b, n in s["load_buckets"]] + [("+Inf", s["loads"])]
        yield HistogramMetricFamily("increlora_task_load_seconds", "Time to load an adapter on first use.",
                                    buckets=buckets, sum_value=s["load_seconds"])
        for name, key, help_text in (("increlora_task_hits", "hits", "Batches that found the task held, by task."),
                                     ("increlora_task_misses", "misses", "Batches that loaded the task, by task.")):
            family = CounterMetricFamily(name, help_text, labels=["task"])
            for task, n in sorted(s[key].items()):
                family.add_metric([task], n)
            yield family
