"""OpenTelemetry spans of each run, when an OTLP endpoint is configured (the ``otel`` extra).

A settled run becomes a tree of spans, from its ``RunLog`` (already in memory; its timeline is
exact to the millisecond)::

    openfusion.run                       the request: generation id, kind, status, preset, cost
    ├── openfusion.stage panel
    │   └── openfusion.member <name>     one per panel member: model, status, cost
    │       ├── openfusion.call <model>  each model call: tokens, cost, tries, error
    │       └── openfusion.tool <name>   each tool call
    ├── openfusion.stage analysis        the judge's analysis ...
    │   └── openfusion.call <judge>
    └── openfusion.stage synthesis       ... and its final answer

Spans are emitted when the run settles, with their real start and end times, rather than
opened while it runs: nothing on the hot path but one call per run, and the exporter's batch
processor sends them off the request's task. A crash mid-run sends nothing for that run (the
run store marks it ``unfinished``). The span's attributes never hold a secret or message text:
ids, model names, counts, costs and failure reasons only.
"""

from __future__ import annotations

from datetime import UTC
from typing import TYPE_CHECKING, Any

from openfusion.engine.runlog import RunLog, Span

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span as OtelSpan

__all__ = ["INSTALL_HINT", "Telemetry"]

INSTALL_HINT = "pip install 'openfusion[otel]'"


class Telemetry:
    """Turns settled runs into spans of ``provider``."""

    def __init__(self, provider: TracerProvider) -> None:
        from openfusion import __version__

        self.provider = provider
        self.tracer = provider.get_tracer("openfusion", __version__)

    @classmethod
    def otlp(cls, endpoint: str) -> Telemetry:
        """Spans exported over OTLP/HTTP to ``endpoint`` (e.g. ``http://collector:4318``),
        in batches, from a thread of the exporter's."""
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            from openfusion.errors import ConfigError

            raise ConfigError(
                f"otlp_endpoint is set but OpenTelemetry is not installed: {INSTALL_HINT}"
            ) from exc
        provider = TracerProvider(resource=Resource.create({"service.name": "openfusion"}))
        url = endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        return cls(provider)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def emit(self, run: RunLog) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        start_ns = int(run.created_at.replace(tzinfo=UTC).timestamp() * 1e9)

        def at(ms: int | None) -> int:
            return start_ns + (ms or 0) * 1_000_000

        last = max((s.end_ms or s.start_ms for s in run.spans), default=0)
        cost = run.end.usage.cost if run.end and run.end.usage else None
        root = self.tracer.start_span(
            "openfusion.run",
            start_time=start_ns,
            attributes=_clean(
                {
                    "openfusion.generation_id": run.run_id,
                    "openfusion.kind": run.kind,
                    "openfusion.status": run.status,
                    "openfusion.preset": run.preset,
                    "openfusion.judge": run.judge,
                    "openfusion.model": run.start.model,
                    "openfusion.key_id": run.start.key_id,
                    "openfusion.cost_usd": cost,
                    "openfusion.failure_reason": run.end.failure_reason if run.end else None,
                }
            ),
        )
        if run.status not in ("ok", "running"):
            root.set_status(Status(StatusCode.ERROR, run.status))
        opened: dict[str, tuple[OtelSpan, Span]] = {}

        def open_span(span: Span, name: str, parent: OtelSpan) -> OtelSpan:
            child = self.tracer.start_span(
                name,
                context=trace.set_span_in_context(parent),
                start_time=at(span.start_ms),
                attributes=_attributes(span),
            )
            if span.status in ("failed", "cancelled"):
                child.set_status(Status(StatusCode.ERROR, span.status))
            return child

        def end(otel: OtelSpan, span: Span) -> None:
            otel.end(end_time=at(span.end_ms if span.end_ms is not None else last))

        kinds = ("stage", "member", "model", "tool")  # parents before their children
        for span in sorted(run.spans, key=lambda s: kinds.index(s.kind)):
            if span.kind == "stage":
                otel = open_span(span, f"openfusion.stage {span.name}", root)
                opened[f"stage:{span.stage}"] = (otel, span)
            elif span.kind == "member":
                parent = opened.get("stage:panel", (root, span))[0]
                otel = open_span(span, f"openfusion.member {span.name}", parent)
                opened[f"member:{span.member}"] = (otel, span)
            else:
                found = opened.get(f"member:{span.member}") or opened.get(f"stage:{span.stage}")
                kind = "tool" if span.kind == "tool" else "call"
                parent = found[0] if found else root
                end(open_span(span, f"openfusion.{kind} {span.name}", parent), span)
        for otel, span in opened.values():
            end(otel, span)
        root.end(end_time=at(run.latency_ms if run.latency_ms is not None else last))


def _attributes(span: Span) -> dict[str, Any]:
    usage = span.data.get("usage") or {}
    error = span.data.get("error") or span.data.get("failure") or {}
    return _clean(
        {
            "openfusion.kind": span.kind,
            "openfusion.stage": span.stage,
            "openfusion.member": span.member,
            "openfusion.status": span.status,
            "openfusion.cost_usd": span.cost,
            "gen_ai.request.model": span.model,
            "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
            "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
            "openfusion.tries": span.data.get("tries"),
            "openfusion.error.reason": error.get("reason") if isinstance(error, dict) else None,
        }
    )


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
