"""The front end's Prometheus metrics (``GET /metrics``), in a registry of its own.

Requests by endpoint and status, a latency histogram, queue depth and batches in flight (read
when scraped), samples per batch, repartitions, readiness, and each rank's cumulative compute
and wait seconds as its last pong reported them (counters owned by another process, so they
are exposed through a collector rather than incremented here).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _RankCollector:
    def __init__(self) -> None:
        self.info: dict[int, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def collect(self):
        with self.lock:
            info = dict(self.info)
        compute = CounterMetricFamily("pipeshift_serve_stage_compute_seconds",
                                      "forward compute time per rank, cumulative", labels=["stage", "rank"])
        wait = CounterMetricFamily("pipeshift_serve_stage_wait_seconds",
                                   "time a rank waited for messages, cumulative", labels=["stage", "rank"])
        batches = CounterMetricFamily("pipeshift_serve_stage_batches", "batches a rank ran", labels=["stage", "rank"])
        for rank, d in sorted(info.items()):
            if d.get("stage") is None:  # a front end of its own: no stage to report
                continue
            labels = [str(d.get("stage", "")), str(rank)]
            compute.add_metric(labels, float(d.get("compute_s", 0.0)))
            wait.add_metric(labels, float(d.get("wait_s", 0.0)))
            batches.add_metric(labels, float(d.get("batches", 0)))
        yield compute
        yield wait
        yield batches


class _Live:
    def __init__(self, read: Callable[[], dict[str, float]]):
        self.read = read

    def collect(self):
        values = self.read()
        for name, doc in (("queue_depth", "requests waiting for a batch"),
                          ("inflight_batches", "batches in the pipeline"),
                          ("ready", "1 when every stage rank answered within the last few seconds")):
            g = GaugeMetricFamily(f"pipeshift_serve_{name}", doc)
            g.add_metric([], float(values.get(name, 0.0)))
            yield g


class ServeMetrics:
    def __init__(self, live: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("pipeshift_serve_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("pipeshift_serve_request_latency_seconds", "time from arrival to answer",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("pipeshift_serve_batch_size", "samples per batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.repartitions = Counter("pipeshift_serve_repartitions", "switches to a new plan while serving",
                                    registry=self.registry)
        self.pause = Histogram("pipeshift_serve_repartition_pause_seconds", "serving paused for a switch",
                               registry=self.registry)
        self._ranks = _RankCollector()
        self.registry.register(self._ranks)
        self.registry.register(_Live(live))

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, samples: int) -> None:
        self.batch_size.observe(samples)

    def ranks(self, info: dict[int, dict[str, Any]]) -> None:
        with self._ranks.lock:
            self._ranks.info = dict(info)

    def switched(self, record: dict[str, Any]) -> None:
        self.repartitions.inc()
        self.pause.observe(float(record.get("pause_s", 0.0)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
