"""Prometheus metrics of a server, at ``GET /metrics`` (text exposition format).

::

    openfusion_http_requests_total{route,method,status}      counter
    openfusion_http_request_seconds{route}                   histogram (to the last byte)
    openfusion_runs_in_flight                                gauge
    openfusion_runs_total{kind,status}                       counter
    openfusion_stage_seconds{stage}                          histogram: panel, analysis,
                                                             synthesis, member, run
    openfusion_inner_calls_total{model,stage,outcome}        counter: ok, failed, cancelled
    openfusion_inner_call_seconds{stage}                     histogram
    openfusion_tokens_total{model,direction}                 counter: prompt, completion
    openfusion_cost_usd_total{model}                         counter (priced calls)
    openfusion_tool_calls_total{tool,outcome}                counter
    openfusion_rate_limited_total                            counter (429s)
    openfusion_breaker_state{model}                          gauge: 0 closed, 1 half-open,
                                                             2 open (models that failed)

Cheap on the hot path: the HTTP middleware does two counter/histogram updates per request; a
run's inner calls are counted once, when the run settles, from its ``RunLog`` (already in
memory) — nothing per streamed chunk, no await. ``route`` is the route's template
(``/v1/fusion/runs/{run_id}``), never a raw path, so the label's values stay few.

Under ``openfusion serve --workers N`` each worker is a process with its own counters: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before starting (prometheus-client's
multi-process mode) and ``/metrics`` sums the workers' files; the breaker gauge then shows the
answering worker's breaker only. Replicas (separate servers) are scraped one by one, as
Prometheus does with any fleet.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openfusion.engine.policy import CircuitBreaker
from openfusion.engine.runlog import RunLog
from openfusion.server.asgi import Routes

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "Metrics", "MetricsMiddleware"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_SERIES = 5000
"""Label sets kept; beyond, updates count under ``other`` (model ids come from requests)."""
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class Metrics:
    """The server's metrics, in a registry of their own (so that several apps in one process,
    as in tests, do not collide)."""

    def __init__(
        self, breaker: CircuitBreaker | None = None, *, multiprocess: bool = False
    ) -> None:
        """``multiprocess``: ``PROMETHEUS_MULTIPROC_DIR`` is set (``--workers N``)."""
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "openfusion_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "openfusion_http_request_seconds",
            "Time from a request's arrival to its last byte (streams included).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "openfusion_runs_in_flight",
            "Runs started and not yet settled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.runs = Counter(
            "openfusion_runs", "Runs settled, by kind and status.", ["kind", "status"], registry=r
        )
        self.stage_seconds = Histogram(
            "openfusion_stage_seconds",
            "Duration of a run's stages (panel, analysis, synthesis), members, and whole runs.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.calls = Counter(
            "openfusion_inner_calls",
            "Inner model calls, by model, stage and outcome.",
            ["model", "stage", "outcome"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "openfusion_inner_call_seconds",
            "Duration of inner model calls (retries included), by stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "openfusion_tokens",
            "Tokens of inner model calls, by model and direction (prompt, completion).",
            ["model", "direction"],
            registry=r,
        )
        self.cost = Counter(
            "openfusion_cost_usd",
            "USD of priced inner calls (model and tool calls), by model or tool.",
            ["model"],
            registry=r,
        )
        self.tools = Counter(
            "openfusion_tool_calls",
            "Tool calls of panel members, by tool and outcome.",
            ["tool", "outcome"],
            registry=r,
        )
        self.rate_limited = Counter(
            "openfusion_rate_limited", "Requests refused by a key's rate limit (429).", registry=r
        )
        self.breaker = BreakerCollector(breaker) if breaker is not None else None
        if self.breaker is not None:
            r.register(self.breaker)
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: ``labels`` validates and locks on every
        call, which costs more than the update itself."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= MAX_SERIES:  # clients choose model ids: stay bounded
                return metric.labels(*["other"] * len(labels))
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_run(self, run: RunLog) -> None:
        """Count a settled run's calls, tokens, cost and timings (from its spans)."""
        child = self.child
        child(self.runs, run.kind, run.status).inc()
        if run.latency_ms is not None:
            child(self.stage_seconds, "run").observe(run.latency_ms / 1000)
        for span in run.spans:
            seconds = None if span.end_ms is None else (span.end_ms - span.start_ms) / 1000
            if span.kind == "model":
                model = span.model or span.name
                stage = span.stage or "call"
                child(self.calls, model, stage, span.status).inc()
                if seconds is not None:
                    child(self.call_seconds, stage).observe(seconds)
                usage = span.data.get("usage") or {}
                for direction in ("prompt", "completion"):
                    tokens = usage.get(f"{direction}_tokens") or 0
                    if tokens:
                        child(self.tokens, model, direction).inc(tokens)
                if span.cost:
                    child(self.cost, model).inc(span.cost)
            elif span.kind == "tool":
                child(self.tools, span.name, span.status).inc()
                if span.cost:
                    child(self.cost, f"tool:{span.name}").inc(span.cost)
            elif seconds is not None:  # stages and members
                stage = (span.stage or span.name) if span.kind == "stage" else "member"
                child(self.stage_seconds, stage).observe(seconds)

    def exposition(self) -> bytes:
        if self.multiprocess:  # every worker's files, and this worker's breaker
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            if self.breaker is not None:
                registry.register(self.breaker)
            return generate_latest(registry)
        return generate_latest(self.registry)


class BreakerCollector(Collector):
    """The breaker's circuits, read at scrape time (nothing to update on the hot path)."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "openfusion_breaker_state",
            "Circuit breaker per model that failed: 0 closed, 1 half-open, 2 open.",
            labels=["model"],
        )
        for model in self.breaker.known():
            family.add_metric([model], BREAKER_STATES[self.breaker.state(model)])
        yield family


class MetricsMiddleware:
    """Counts every HTTP request by its route template and status, and times it to its last
    byte. Outermost, so the 401s of the key check count too."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Routes) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self._route(scope)
            metrics = self.metrics
            method = scope["method"] if scope["method"] in METHODS else "other"
            metrics.child(metrics.requests, route, method, str(status)).inc()
            metrics.child(metrics.request_seconds, route).observe(time.perf_counter() - began)

    def _route(self, scope: Scope) -> str:
        return self.routes.template(scope["path"]) or "other"
