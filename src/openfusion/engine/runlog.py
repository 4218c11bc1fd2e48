"""``RunLog``: one run's trace kept in memory, as the run store writes it and the runs API shows it.

A run is a list of spans on one time axis (milliseconds from the run's start):

- ``member``: a panel member from ``running`` to its answer or failure (its answer, usage,
  latency, tries, failure);
- ``stage``: ``panel`` (first member started → last ended), ``analysis``, ``synthesis``;
- ``model``: one model call (messages sent, reply, tool calls asked for, usage, cost, tries,
  failure) — a member's turns, the judge's calls, a caller's or a plain call;
- ``tool``: one tool call (arguments, truncated result, cost, sources, error).

Every change bumps a version (the run's, and the span's), so a writer can tell what it has not
written yet. Message texts are cut to ``MESSAGE_CHARS`` (tool results to ``TOOL_RESULT_CHARS``)
so a long tool loop does not make a record of megabytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from openfusion.engine.result import (
    AnswerDelta,
    Done,
    FusionResult,
    MemberEvent,
    MemberFailure,
    MemberResponse,
    StageEvent,
)
from openfusion.engine.trace import (
    CallRecord,
    FusionPlan,
    ModelCallEvent,
    RunEnd,
    RunKind,
    RunStart,
    ToolCallEvent,
    TraceEvent,
)
from openfusion.types import Message, ToolCall, Usage

MESSAGE_CHARS = 4000
TOOL_RESULT_CHARS = 500

SpanKind = Literal["member", "stage", "model", "tool"]
SpanStatus = Literal["waiting", "running", "ok", "failed", "cancelled"]
RunStatus = Literal["running", "ok", "error", "cancelled", "unfinished"]


@dataclass
class Span:
    seq: int
    kind: SpanKind
    name: str
    stage: str | None
    member: int | None
    status: SpanStatus
    start_ms: int
    end_ms: int | None = None
    model: str | None = None
    cost: float | None = None
    """USD; ``None`` while running or when unknown."""
    data: dict[str, Any] = field(default_factory=dict)
    version: int = 1


@dataclass(frozen=True, slots=True)
class CallCost:
    """One finished inner call, as the spend ledger charges it."""

    stage: str
    model: str | None
    cost: float | None


def billed(kind: str, status: str, cost: float | int | None) -> bool:
    """Whether a span is a call the spend ledger charges: a model or tool call that ended, and
    either answered or cost something when it failed (upstreams do not bill a failed model
    call; a tool may). A call cancelled mid-way has no known cost and is left out."""
    if kind not in ("model", "tool"):
        return False
    return status == "ok" or (status == "failed" and cost != 0)


class RunLog:
    """A run's trace in memory: ``event`` feeds it (``RunTrace``), ``finish`` ends it.

    ``on_change`` is called after every change (the store's recorder uses it to know what to
    write); it must not block or raise.
    """

    def __init__(
        self,
        start: RunStart,
        *,
        source: str = "library",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[RunLog], None] | None = None,
    ) -> None:
        self.start = start
        self.source = source
        self.kind: RunKind = start.kind
        self._clock = clock
        self.started = clock()
        self.created_at = datetime.now(UTC).replace(tzinfo=None)
        self.preset: str | None = None
        self.judge: str | None = None
        self.members: list[dict[str, Any]] = []
        self.options: dict[str, Any] = dict(start.options)
        self.status: RunStatus = "running"
        self.answer_parts: list[str] = []
        self.analysis: dict[str, Any] | None = None
        self.result: FusionResult | None = None
        self.end: RunEnd | None = None
        self.finished_at: datetime | None = None
        self.latency_ms: int | None = None
        self.spans: list[Span] = []
        self.version = 1
        self._open: dict[str, Span] = {}
        self._on_change = on_change

    @property
    def run_id(self) -> str:
        return self.start.id

    @property
    def answer(self) -> str:
        return "".join(self.answer_parts)

    @property
    def finished(self) -> bool:
        return self.end is not None

    def ms(self, moment: float | None = None) -> int:
        """Milliseconds from the run's start to ``moment`` (``time.monotonic()``; now)."""
        moment = self._clock() if moment is None else moment
        return max(0, round((moment - self.started) * 1000))

    # -- feeding ---------------------------------------------------------------------------

    def event(self, event: TraceEvent) -> None:
        if self.end is not None:
            return  # a late event of a run already ended (cancelled) changes nothing
        if isinstance(event, FusionPlan):
            self._plan(event)
        elif isinstance(event, MemberEvent):
            self._member(event)
        elif isinstance(event, StageEvent):
            self._stage(event)
        elif isinstance(event, ModelCallEvent):
            self._model_call(event)
        elif isinstance(event, ToolCallEvent):
            self._tool_call(event)
        elif isinstance(event, AnswerDelta):
            self.answer_parts.append(event.text)
        elif isinstance(event, Done):
            self.result = event.result
            self.analysis = event.result.analysis
        else:  # ToolEvent: its ToolCallEvent carries all of it
            return
        self._changed()

    def finish(self, end: RunEnd) -> None:
        """End the run (once; later calls are ignored). Spans still open end now, cancelled."""
        if self.end is not None:
            return
        self.end = end
        self.result = end.result or self.result
        if self.result is not None:
            self.analysis = self.result.analysis
        self.status = end.status
        if end.content or end.status == "ok":
            self.answer_parts = [end.content]
        now = self.ms()
        for span in self._open.values():
            span.status, span.end_ms = "cancelled", now
            span.version += 1
        self._open.clear()
        self.finished_at = datetime.now(UTC).replace(tzinfo=None)
        self.latency_ms = now
        self._changed()

    # -- reading ---------------------------------------------------------------------------

    def calls(self) -> list[CallCost]:
        """The calls the spend ledger charges (see ``billed``), in the order they ended."""
        return [
            CallCost("tool" if s.kind == "tool" else s.stage or "call", s.model or s.name, s.cost)
            for s in self.spans
            if billed(s.kind, s.status, s.cost)
        ]

    def question(self) -> str:
        return next((m.content for m in reversed(self.start.messages) if m.role == "user"), "")

    # -- internals -------------------------------------------------------------------------

    def _changed(self) -> None:
        self.version += 1
        if self._on_change is not None:
            self._on_change(self)

    def _span(
        self,
        kind: SpanKind,
        name: str,
        *,
        stage: str | None,
        member: int | None,
        status: SpanStatus,
        start_ms: int,
        **fields: Any,
    ) -> Span:
        span = Span(len(self.spans), kind, name, stage, member, status, start_ms, **fields)
        self.spans.append(span)
        return span

    def _plan(self, plan: FusionPlan) -> None:
        self.preset, self.judge = plan.preset, plan.judge
        self.members = [{"index": i, "name": n, "model": m} for i, n, m in plan.members]
        self.options.update(plan.options)
        self._open["stage:panel"] = self._span(
            "stage", "panel", stage="panel", member=None, status="running", start_ms=self.ms()
        )

    def _member(self, event: MemberEvent) -> None:
        key = f"member:{event.index}"
        span = self._open.get(key)
        if span is None:
            model = next((m["model"] for m in self.members if m["index"] == event.index), None)
            span = self._span(
                "member",
                event.name,
                stage="panel",
                member=event.index,
                status="waiting",
                start_ms=self.ms(),
                model=model,
            )
            self._open[key] = span
        if event.state == "running":
            span.status, span.start_ms = "running", self.ms()
        elif event.state in ("done", "failed"):
            span.status = "ok" if event.state == "done" else "failed"
            span.end_ms = self.ms()
            span.cost = event.usage.cost if event.usage else None
            span.data.update(_outcome(event))
            if isinstance(event.outcome, MemberResponse):
                span.model = event.outcome.model  # a fallback, maybe
            del self._open[key]
            if not any(k.startswith("member:") for k in self._open):
                self._close("stage:panel", "ok")
        span.version += 1

    def _stage(self, event: StageEvent) -> None:
        key = f"stage:{event.stage}"
        if event.state == "running":
            self._close("stage:panel", "ok")
            self._open[key] = self._span(
                "stage",
                event.stage,
                stage=event.stage,
                member=None,
                status="running",
                start_ms=self.ms(),
            )
            return
        if event.analysis is not None:
            self.analysis = event.analysis
        self._close(
            key,
            "ok" if event.state == "done" else "failed",
            cost=event.usage.cost if event.usage else None,
            usage=_usage(event.usage),
            reason=event.reason,
        )

    def _close(self, key: str, status: SpanStatus, cost: float | None = None, **data: Any) -> None:
        span = self._open.pop(key, None)
        if span is None:
            return
        span.status, span.end_ms, span.cost = status, self.ms(), cost
        span.data.update({k: v for k, v in data.items() if v is not None})
        span.version += 1

    def _model_call(self, event: ModelCallEvent) -> None:
        record = event.record
        status: SpanStatus = "cancelled" if record.cancelled else "ok"
        if record.error is not None:
            status = "failed"
        self._span(
            "model",
            record.model or record.models[0],
            stage=event.stage,
            member=event.member,
            status=status,
            start_ms=self.ms(record.started),
            end_ms=self.ms(record.ended),
            model=record.model or record.models[0],
            cost=None if record.cancelled else record.usage.cost,
            data=_call_data(record),
        )

    def _tool_call(self, event: ToolCallEvent) -> None:
        record = event.record
        self._span(
            "tool",
            record.name,
            stage="panel",
            member=event.member,
            status="ok" if record.error is None else "failed",
            start_ms=self.ms(event.started),
            end_ms=self.ms(event.ended),
            cost=record.cost,
            data={
                "arguments": record.arguments,
                "result": record.result[:TOOL_RESULT_CHARS],
                "error": record.error,
                "sources": list(record.sources),
            },
        )


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    return usage.to_dict() if usage is not None else None


def _outcome(event: MemberEvent) -> dict[str, Any]:
    data: dict[str, Any] = {"usage": _usage(event.usage), "reason": event.reason}
    outcome = event.outcome
    if isinstance(outcome, MemberResponse):
        data |= {"model": outcome.model, "content": outcome.content}
        data |= {"latency_ms": outcome.latency_ms, "tool_calls": len(outcome.tool_calls)}
    elif isinstance(outcome, MemberFailure):
        data |= {"failure": {"reason": outcome.reason, "status": outcome.status}}
        data["failure"]["message"] = outcome.message
        data["tries"] = outcome.tries
    return {k: v for k, v in data.items() if v is not None}


def _call_data(record: CallRecord) -> dict[str, Any]:
    error = record.error
    return {
        "models": list(record.models),
        "messages": list(_messages(record.messages)),
        "content": record.content,
        "tool_calls": [_call_dict(c) for c in record.tool_calls],
        "usage": record.usage.to_dict(),
        "tries": record.tries,
        "error": None
        if error is None
        else {"reason": error.reason, "status": error.status, "message": error.message},
    }


def message_dict(message: Message, limit: int | None = None) -> dict[str, Any]:
    """A message as a record keeps it: its content cut to ``limit`` characters (noted)."""
    content = message.content
    if limit is not None and len(content) > limit:
        content = content[:limit] + f"… [{len(message.content) - limit} more characters]"
    item: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls:
        item["tool_calls"] = [_call_dict(c) for c in message.tool_calls]
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    return item


def _messages(messages: Iterable[Message]) -> Iterable[dict[str, Any]]:
    for message in messages:
        yield message_dict(message, TOOL_RESULT_CHARS if message.role == "tool" else MESSAGE_CHARS)


def _call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}
