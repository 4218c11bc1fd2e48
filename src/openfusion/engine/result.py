"""What a fusion produces: per-member outcomes, the result object, and the progress events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from openfusion.types import ToolCall, Usage

FailureReason = Literal[
    "all_panels_failed",
    "insufficient_credits",
    "rate_limited",
    "fusion_invocation_capped",
    "unexpected_error",
    "caller_upstream_error",
    "judge_not_valid_json",
    "judge_schema_mismatch",
    "judge_upstream_error",
    "judge_empty_completion",
]


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One tool call a member made: what it asked, what came back (truncated), what it cost."""

    name: str
    arguments: str
    result: str
    cost: float | None
    error: str | None = None
    sources: tuple[str, ...] = ()
    """URLs of the documents the call returned."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arguments": self.arguments,
            "result": self.result,
            "cost": self.cost,
            "error": self.error,
            "sources": list(self.sources),
        }


@dataclass(frozen=True, slots=True)
class MemberResponse:
    """A panel member that answered."""

    model: str
    name: str
    """Unique within the panel: the model id, with ``#k`` when one model fills several slots."""
    content: str
    usage: Usage
    """Every model call of the member plus its tool calls' cost."""
    latency_ms: int
    tool_calls: tuple[ToolCallRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "name": self.name,
            "content": self.content,
            "usage": self.usage.to_dict(),
            "cost": self.usage.cost,
            "latency_ms": self.latency_ms,
            "tool_calls": [call.to_dict() for call in self.tool_calls],
        }


@dataclass(frozen=True, slots=True)
class MemberFailure:
    """A panel member that did not answer, and why (the upstream's own message is kept)."""

    model: str
    name: str
    reason: str
    status: int | None
    message: str
    usage: Usage = field(default_factory=Usage)
    tries: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "name": self.name,
            "reason": self.reason,
            "status": self.status,
            "message": self.message,
            "tries": self.tries,
        }


@dataclass(frozen=True, slots=True)
class FusionResult:
    status: Literal["ok", "error"]
    content: str
    """The final answer (empty when ``status`` is ``error``)."""
    analysis: dict[str, Any] | None
    responses: tuple[MemberResponse, ...]
    failed_models: tuple[MemberFailure, ...]
    failure_reason: FailureReason | None
    failure_message: str | None
    usage: Usage
    cost_details: dict[str, float | None]
    """Cost per stage run: ``panel``, ``analysis``, ``synthesis`` (USD; ``None`` if unknown)."""
    judge: str
    latency_ms: int
    run_id: str = ""
    """Names this run in traces and records (the server uses the generation id)."""
    budget: dict[str, Any] | None = None
    """With ``max_cost``: the limit, what was spent, and the models not started because of it."""
    sources: tuple[dict[str, Any], ...] = ()
    """Documents the run retrieved, numbered as the answer cites them: ``[1]`` is the first."""
    annotations: tuple[dict[str, Any], ...] = ()
    """OpenAI-style ``url_citation`` annotations of the answer's verified ``[n]`` citations."""
    unverified_citations: tuple[dict[str, str], ...] = ()
    """Citations (``[n]`` or URLs) in the answers that no tool call of this run retrieved."""
    caller: str | None = None
    """The caller tier: the caller model that wrote the answer (``None``: the judge did)."""
    fused: bool = True
    """False when a caller answered without invoking the fusion (the fusion fields are empty)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls the caller made to the client's own functions: the client runs them."""
    finish_reason: str = "stop"
    caller_failure: MemberFailure | None = None
    """The caller tier: the caller's own failure (``caller_upstream_error`` and the like)."""
    selection: tuple[dict[str, Any], ...] = ()
    """Select mode: each distinct panel answer with its ``votes``, the judge's ``loglik``
    (mean log-probability per token) and ``score``, best first."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage run (``retrieval``, ``panel``, ``analysis``, ``synthesis``)."""

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens generated per second of the run's model stages (``None`` before any)."""
        seconds = sum(t for stage, t in self.timings.items() if stage != "retrieval")
        tokens = self.usage.completion_tokens
        return round(tokens / seconds, 1) if seconds > 0 and tokens else None

    @property
    def unpriced(self) -> list[str]:
        """What made ``usage.cost`` unknown: members and stages whose cost is not known."""
        members = [r.name for r in self.responses if r.usage.cost is None]
        members += [f.name for f in self.failed_models if f.usage.cost is None]
        stages = [s for s, cost in self.cost_details.items() if cost is None and s != "panel"]
        return members + stages

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "content": self.content,
            "analysis": self.analysis,
            "responses": [r.to_dict() for r in self.responses],
            "failed_models": [f.to_dict() for f in self.failed_models],
            "failure_reason": self.failure_reason,
            "failure_message": self.failure_message,
            "judge": self.judge,
            "latency_ms": self.latency_ms,
            "usage": {
                **self.usage.to_dict(),
                "cost_details": self.cost_details,
                "unpriced": self.unpriced,
            },
            "budget": self.budget,
            "sources": list(self.sources),
            "annotations": list(self.annotations),
            "unverified_citations": list(self.unverified_citations),
            "caller": self.caller,
            "fused": self.fused,
            "tool_calls": [
                {"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls
            ],
            "finish_reason": self.finish_reason,
            "caller_failure": self.caller_failure.to_dict() if self.caller_failure else None,
            "selection": list(self.selection),
            "timings": {stage: round(t, 3) for stage, t in self.timings.items()},
            "tokens_per_second": self.tokens_per_second,
        }


# --- progress events, in the order a run emits them -------------------------------------------

MemberState = Literal["waiting", "running", "done", "failed"]
StageName = Literal["caller", "analysis", "synthesis"]
StageState = Literal["running", "done", "failed"]


@dataclass(frozen=True, slots=True)
class MemberEvent:
    index: int
    name: str
    state: MemberState
    elapsed: float = 0.0
    usage: Usage | None = None
    reason: str | None = None
    outcome: MemberResponse | MemberFailure | None = None
    """On ``done`` and ``failed``: the member's answer, or its failure."""


@dataclass(frozen=True, slots=True)
class ToolEvent:
    """A panel member called a tool (sent when the call is done)."""

    index: int
    name: str
    tool: str
    arguments: str
    ok: bool


@dataclass(frozen=True, slots=True)
class StageEvent:
    """A judge stage, or (``caller``) one call of the caller model in the caller tier."""

    stage: StageName
    state: StageState
    elapsed: float = 0.0
    usage: Usage | None = None
    reason: str | None = None
    analysis: dict[str, Any] | None = None
    """On the analysis stage's ``done``: the analysis (models named by panel member)."""
    model: str | None = None
    """The model running it (on ``running``: the first to be tried; after: the one that ran)."""
    sources: tuple[dict[str, Any], ...] = ()
    """``analysis`` ended: the documents retrieved so far, numbered as the answer cites them."""


@dataclass(frozen=True, slots=True)
class FusionCallEvent:
    """The caller tier: the caller invoked the fusion tool (``running``) and it ended
    (``done``, with the fusion's result, or ``capped``: over the allowed number of fusions)."""

    call_id: str
    state: Literal["running", "done", "capped"]
    prompt: str
    result: FusionResult | None = None


@dataclass(frozen=True, slots=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    result: FusionResult


FusionEvent = MemberEvent | ToolEvent | StageEvent | FusionCallEvent | AnswerDelta | Done
