"""Prometheus metrics of the HTTP server (GET /metrics), with prometheus_client: requests by
finish reason, tokens read, cached and generated, drafts kept, time to first token, queue
time and latency (histograms), rows running and requests waiting, and the offloading
runtime's own counts since load: expert hits, misses, prefetches, host-run experts, bytes
moved to the device, prefetch predictions, expert slots. Each server has its own registry.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "moe_serve"
# seconds: a token from an offloaded model takes from milliseconds to seconds
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
# OffloadedModel.total_counters() key -> (metric name, help)
MODEL_COUNTS = {
    "hits": ("expert_hits", "expert uses served from a device slot"),
    "misses": ("expert_misses", "expert uses that copied the expert in when needed"),
    "prefetched": ("experts_prefetched", "experts copied ahead of their layer"),
    "on_host": ("experts_on_host", "expert uses run on the host CPU"),
    "skipped": ("experts_skipped", "missing experts of low weight left out"),
    "low_precision": ("experts_low_precision", "expert uses run from a low-precision "
                      "stand-in"),
    "bytes_to_device": ("bytes_to_device", "expert bytes copied to the device"),
    "predicted": ("prefetch_predicted", "experts the cross-layer predictor named"),
    "correct": ("prefetch_correct", "predicted experts the layer then used"),
    "actual": ("prefetch_actual", "experts used by layers that had a prediction"),
    "copied": ("prefetch_copied", "layer predictions whose experts were copied ahead"),
    "withheld": ("prefetch_withheld", "layer predictions scored but not copied (precision "
                 "under prefetch_min_precision)"),
}


class _ModelCollector:
    """The runtime's counts since load and its expert slots, read at each scrape."""

    def __init__(self, model):
        self.model = model

    def collect(self):
        counts = self.model.total_counters()
        for key, (name, doc) in MODEL_COUNTS.items():
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            c.add_metric([], counts[key])
            yield c
        for name, doc, value in (
                ("expert_slots", "expert slots on the device", self.model.n_slots),
                ("experts_total", "experts of the model", self.model.store.total_experts)):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            g.add_metric([], value)
            yield g


class Metrics:
    """The server's metrics: `done(request)` as each request ends (served, failed by a batch
    error, or cancelled before it started); `render()` -> (body, content type) for GET
    /metrics. running and waiting: callables giving the rows decoding and the requests not
    started yet."""

    def __init__(self, model, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "requests ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter(f"{PREFIX}_request_errors", "requests a batch error ended",
                              registry=r)
        self.tokens = {key: Counter(f"{PREFIX}_{name}", doc, registry=r) for key, name, doc in (
            ("prompt_tokens", "prompt_tokens", "prompt tokens of ended requests"),
            ("cached_tokens", "prompt_cached_tokens",
             "prompt tokens a KV-cache row held already (not read again)"),
            ("new_tokens", "generation_tokens", "tokens generated"),
            ("drafted_tokens", "spec_drafted_tokens", "tokens drafted for speculation"),
            ("accepted_tokens", "spec_accepted_tokens", "drafted tokens the model kept"))}
        self.times = {key: Histogram(f"{PREFIX}_{name}", doc, buckets=BUCKETS, registry=r)
                      for key, name, doc in (
            ("ttft_s", "time_to_first_token_seconds", "from arrival to the first token"),
            ("queue_s", "queue_seconds", "from arrival to the start of the prefill"),
            ("latency_s", "request_latency_seconds", "from arrival to the last token"))}
        Gauge(f"{PREFIX}_requests_running", "rows decoding", registry=r).set_function(running)
        Gauge(f"{PREFIX}_requests_waiting", "requests not started yet",
              registry=r).set_function(waiting)
        r.register(_ModelCollector(model))

    def done(self, req) -> None:
        """Count request req (a serve.batcher.Request that has ended)."""
        if req.error is not None:
            self.errors.inc()
            return
        if req.completion is None:  # its client left before it started
            self.requests.labels("cancelled").inc()
            return
        self.requests.labels(req.completion.finish_reason or "unknown").inc()
        for key, counter in self.tokens.items():
            counter.inc(req.stats.get(key, 0))
        for key, hist in self.times.items():
            hist.observe(req.stats[key])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
