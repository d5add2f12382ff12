"""Prometheus metrics of the HTTP service, in a registry per app (never the process-global one)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
