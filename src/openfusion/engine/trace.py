"""What a run did, call by call: the trace the engine feeds while it runs.

The public event stream (``Fusion.stream``) says how a run is going; the trace says everything
it did, for the run store and anything else that records runs. Whoever drives a run — the
library, the CLI, the server — hands the engine a ``RunTrace`` (``Fusion.stream(trace=...)``);
the engine calls ``trace.event(...)`` as things happen, synchronously and cheaply (no I/O):

- ``FusionPlan`` once, before the panel starts: the preset, the judge, the members;
- the public events as they are emitted (``MemberEvent`` with the member's outcome,
  ``StageEvent`` with the analysis, ``ToolEvent``, ``AnswerDelta``, ``Done``);
- ``ModelCallEvent`` when a model call ends: the messages sent, the reply, usage and cost,
  tries, failure or cancellation, start and end times (``Caller`` builds its ``CallRecord``);
- ``ToolCallEvent`` when a tool call ends: arguments, truncated result, cost, sources, times.

``RunLog`` (``engine/runlog.py``) is the in-memory trace that the store persists. A
``RunRecorder`` hands out a ``RunLog`` per run and records it (``store/recorder.py``). The
engine itself holds no SQL and does no I/O for a trace.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from openfusion.engine.result import FusionEvent, FusionResult, ToolCallRecord
from openfusion.errors import ProviderError
from openfusion.types import Message, ToolCall, Usage

RunKind = Literal["fusion", "caller", "call"]
"""A fusion; a caller model that may call a fusion as a tool; a plain call to one model."""
Stage = Literal["panel", "analysis", "synthesis", "caller", "call"]
EndStatus = Literal["ok", "error", "cancelled"]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One logical model call as ``Caller`` made it (retries and fallbacks included)."""

    models: tuple[str, ...]
    """The models it could use, in order (the first, then its fallbacks)."""
    model: str | None
    """The model that answered; ``None`` when none did."""
    messages: tuple[Message, ...]
    content: str
    tool_calls: tuple[ToolCall, ...]
    usage: Usage
    tries: int | None
    """Calls made, retries and fallbacks included (``None``: not counted)."""
    error: ProviderError | None
    cancelled: bool
    started: float
    """``time.monotonic()`` when the call started; ``ended`` likewise."""
    ended: float


CallObserver = Callable[[CallRecord], None]


@dataclass(frozen=True, slots=True)
class FusionPlan:
    """A fusion is about to start: what it will run."""

    preset: str
    judge: str
    members: tuple[tuple[int, str, str], ...]
    """``(index, name, model)`` of each panel member."""
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelCallEvent:
    stage: Stage
    member: int | None
    """The panel member's index (panel calls only)."""
    record: CallRecord


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    member: int
    record: ToolCallRecord
    started: float
    ended: float


TraceEvent = FusionEvent | FusionPlan | ModelCallEvent | ToolCallEvent


class RunTrace(Protocol):
    """Receives what a run does, as it does it. Must not block and must not raise."""

    def event(self, event: TraceEvent) -> None: ...


@dataclass(frozen=True, slots=True)
class RunStart:
    """What a run was asked to do."""

    id: str
    kind: RunKind
    messages: tuple[Message, ...]
    model: str | None = None
    """What was asked for: ``openfusion/<preset>``, or a model id."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """The request's options (temperature, max_cost, tools, ...), JSON-able."""
    key_id: str | None = None
    reservation_id: str | None = None
    streamed: bool = False


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How a run ended."""

    status: EndStatus
    content: str = ""
    usage: Usage | None = None
    cost_details: Mapping[str, float | None] = field(default_factory=dict)
    result: FusionResult | None = None
    failure_reason: str | None = None
    failure_message: str | None = None

    @classmethod
    def of(cls, result: FusionResult) -> RunEnd:
        return cls(
            status=result.status,
            content=result.content,
            usage=result.usage,
            cost_details=result.cost_details,
            result=result,
            failure_reason=result.failure_reason,
            failure_message=result.failure_message,
        )


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT = _Default.DEFAULT
"""``Fusion(recorder=DEFAULT)``: record to the store the settings name (``[store] record``)."""
UseDefault = Literal[_Default.DEFAULT]


class RunRecorder(Protocol):
    """Records runs: hands out a trace per run and keeps what it receives."""

    def start_run(self, start: RunStart) -> RunTraceHandle: ...

    async def aclose(self) -> None:
        """Record what is still pending, then release what the recorder holds."""
        ...


class RunTraceHandle(RunTrace, Protocol):
    """A run's trace as a recorder hands it out: ended with ``finish``."""

    @property
    def run_id(self) -> str: ...

    def finish(self, end: RunEnd) -> None: ...
