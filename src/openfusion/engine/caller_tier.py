"""The caller tier: a model of the client's choice decides whether a prompt deserves a panel.

The caller is offered a ``fusion`` tool beside the client's own functions. When it calls the
fusion, the preset's panel answers the prompt it wrote, the judge analyses the answers (no
synthesis), and the caller gets the analysis and the answers as the tool's result; then it
writes the answer. A call to one of the client's functions ends the run: the client runs it.

Every call of the caller counts against the run's budget like the fusion's own calls, and is
reported as a ``StageEvent("caller", ...)`` when it ends, so its cost is on record even when
something later fails. The fusion runs at most ``max_fusions`` times; an invocation past that
is answered with an error and the run ends with ``fusion_invocation_capped``.

Turns that may call a tool are not streamed (their text is kept back until the turn turns out
to be the answer, so a forced fusion never shows a half answer); a turn that cannot call tools
streams its text as it comes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openfusion.engine import citations
from openfusion.engine.result import (
    AnswerDelta,
    Done,
    FailureReason,
    FusionCallEvent,
    FusionEvent,
    FusionResult,
    MemberFailure,
    StageEvent,
)
from openfusion.engine.run import DEPTH_HEADER, FusionRun, RunContext, last_user
from openfusion.errors import ProviderError
from openfusion.types import Completion, Message, ToolCall, ToolSpec, Usage

if TYPE_CHECKING:
    from openfusion.engine.fusion import Fusion

FUSION_TOOL = "fusion"


def fusion_tool(fusion: Fusion) -> ToolSpec:
    """The ``fusion`` tool as the caller model is offered it."""
    description = fusion.prompts.render("fusion_tool", panel_size=len(fusion.preset.panel))
    return ToolSpec(
        name=FUSION_TOOL,
        description=description,
        parameters={
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "description": "The question to deliberate."}
            },
            "required": ["prompt"],
        },
    )


@dataclass(frozen=True, slots=True)
class _Turn:
    """One call of the caller model."""

    model: str
    completion: Completion


class CallerTier:
    def __init__(
        self,
        context: RunContext,
        models: tuple[str, ...],
        messages: tuple[Message, ...],
        *,
        functions: tuple[ToolSpec, ...],
        tool_choice: str | None,
        max_fusions: int,
    ) -> None:
        fusion, options = context.fusion, context.options
        self.context = context
        self.fusion = fusion
        self.models = models
        self.messages = list(messages)
        self.functions = functions
        self.tool_choice = tool_choice
        self.max_fusions = max_fusions
        self.options = options
        self.budget = context.budget
        self._emit = context.emit
        self.trace = context.trace
        self.observe = context.trace.observer("caller")
        self.started = time.monotonic()
        self.usage = Usage()
        """What the caller's own calls spent."""
        self.fusions: list[FusionResult] = []
        self.capped = False
        self.tools = (fusion_tool(fusion), *functions)
        self.base = options.request(
            model="",
            messages=(),
            seed=options.seed,
            headers={DEPTH_HEADER: str(fusion.depth + 1)},
            reasoning=options.reasoning,
            user=options.user,
            tools=self.tools,
        )

    def emit(self, event: FusionEvent) -> None:
        self.trace(event)
        self._emit(event)

    async def execute(self) -> None:
        choice = self._first_choice()
        turn: _Turn | None = None
        for _ in range(self.max_fusions + 2):  # each fusion, a capped one, and the answer
            try:
                turn = await self._call(choice)
            except ProviderError as exc:
                self._finish_failed(exc)
                return
            completion = turn.completion
            calls = completion.tool_calls
            fused = any(c.name == FUSION_TOOL for c in calls)
            if (choice == FUSION_TOOL and not fused) or (choice == "required" and not calls):
                # Forced, but the model cannot call tools (or would not): call it for it.
                prompt = json.dumps({"prompt": last_user(self.messages)})
                calls = (ToolCall("call_fusion", FUSION_TOOL, prompt),)
            own = tuple(c for c in calls if c.name != FUSION_TOOL)
            if own:  # the client's functions: the client runs them and calls back
                self._finish(turn, "", own)
                return
            if not calls:
                if choice != "none":  # not streamed: its text goes out now, whole
                    self.emit(AnswerDelta(completion.content))
                self._finish(turn, completion.content)
                return
            self.messages.append(Message("assistant", completion.content, tool_calls=calls))
            for call in calls:
                self.messages.append(Message("tool", await self._fuse(call), tool_call_id=call.id))
            choice = "none" if self.capped or not self.functions else "auto"
        assert turn is not None
        self._finish(turn, "")  # it kept calling the fusion past the cap

    def _first_choice(self) -> str:
        if self.tool_choice in (None, "auto", "required", "none", FUSION_TOOL):
            return self.tool_choice or "auto"
        return self.tool_choice  # one of the client's functions, by name

    async def _call(self, choice: str) -> _Turn:
        """One turn of the caller; streamed (and its text emitted) when it cannot call tools."""
        self.emit(StageEvent("caller", "running", model=self.models[0]))
        started = time.monotonic()
        request = dataclasses.replace(
            self.base,
            messages=tuple(self.messages),
            tool_choice=_wire_choice(choice),
        )
        usage = Usage()
        try:
            if choice == "none":
                parts: list[str] = []
                calls: list[ToolCall] = []  # a model may call a tool it was told not to
                finish: str | None = None
                stream = self.fusion.caller.stream(
                    self.models, request, self.budget, observe=self.observe
                )
                async for chunk in stream:
                    if chunk.delta:
                        parts.append(chunk.delta)
                        self.emit(AnswerDelta(chunk.delta))
                    usage = chunk.usage or usage
                    finish = chunk.finish_reason or finish
                    calls.extend(chunk.tool_calls)
                # A stream does not say which model answered: a fallback may have.
                model = self.models[0]
                completion = Completion("".join(parts), usage, model, finish, tuple(calls))
            else:
                call = await self.fusion.caller.complete(
                    self.models, request, self.budget, observe=self.observe
                )
                completion, model = call.completion, call.model
        except ProviderError as exc:
            usage = exc.usage or usage
            self.usage += usage
            elapsed = time.monotonic() - started
            failed = StageEvent("caller", "failed", elapsed, usage, exc.reason)
            self.emit(dataclasses.replace(failed, model=self.models[0]))
            raise
        self.usage += completion.usage
        elapsed = time.monotonic() - started
        self.emit(StageEvent("caller", "done", elapsed, completion.usage, model=model))
        return _Turn(model, completion)

    async def _fuse(self, call: ToolCall) -> str:
        """Run the fusion the caller invoked; the tool result it reads (JSON)."""
        prompt = _tool_prompt(call) or last_user(self.messages)
        if len(self.fusions) >= self.max_fusions:
            self.capped = True
            self.emit(FusionCallEvent(call.id, "capped", prompt))
            return json.dumps(
                {
                    "error": f"the fusion may run at most {self.max_fusions} time(s) per "
                    "request; answer with what you have",
                    "failure_reason": "fusion_invocation_capped",
                }
            )
        self.emit(FusionCallEvent(call.id, "running", prompt))
        results: list[FusionResult] = []

        def forward(event: FusionEvent) -> None:  # the inner run traced it already
            if isinstance(event, Done):
                results.append(event.result)
            else:
                self._emit(event)

        inner = dataclasses.replace(
            self.context,
            options=dataclasses.replace(self.options, reasoning=None),  # the preset's, for it
            emit=forward,
            run_id=f"{self.context.run_id}-{len(self.fusions) + 1}",
        )
        await FusionRun(inner, (Message("user", prompt),)).execute(synthesise=False)
        (result,) = results
        self.fusions.append(result)
        self.emit(FusionCallEvent(call.id, "done", prompt, result))
        return json.dumps(_tool_result(result), ensure_ascii=False)

    # -- the result -----------------------------------------------------------------------

    def _finish(self, turn: _Turn, content: str, own: tuple[ToolCall, ...] = ()) -> None:
        fused = self.fusions[-1] if self.fusions else None
        annotations: tuple[dict[str, Any], ...] = ()
        unverified: tuple[dict[str, str], ...] = ()
        if fused is not None and content:
            checked = citations.check(
                content, _refs(fused), fused.responses, listing=not self.options.structured
            )
            if checked.content != content:
                self.emit(AnswerDelta(checked.content[len(content) :]))
            content, annotations, unverified = (
                checked.content,
                checked.annotations,
                checked.unverified,
            )
        finish = "tool_calls" if own else turn.completion.finish_reason or "stop"
        self.emit(Done(self._result(content, turn.model, own, finish, annotations, unverified)))

    def _finish_failed(self, error: ProviderError) -> None:
        failure = MemberFailure(
            self.models[0],
            "caller",
            error.reason,
            error.status,
            error.message,
            usage=error.usage or Usage(),
            tries=error.tries,
        )
        result = self._result("", None, (), "error", (), ())
        self.emit(
            Done(
                dataclasses.replace(
                    result,
                    status="error",
                    failure_reason=_caller_reason(error),
                    failure_message=f"the caller model failed: {error.message}",
                    caller_failure=failure,
                )
            )
        )

    def _result(
        self,
        content: str,
        caller: str | None,
        own: tuple[ToolCall, ...],
        finish: str,
        annotations: tuple[dict[str, Any], ...],
        unverified: tuple[dict[str, str], ...],
    ) -> FusionResult:
        fused = self.fusions[-1] if self.fusions else None
        usage = self.usage
        costs: dict[str, float | None] = {"caller": self.usage.cost}
        for result in self.fusions:
            usage += result.usage
            for stage, cost in result.cost_details.items():
                before = costs.get(stage, 0.0)
                costs[stage] = None if before is None or cost is None else before + cost
        reason: FailureReason | None = fused.failure_reason if fused else None
        message = fused.failure_message if fused else None
        if self.capped:
            reason = "fusion_invocation_capped"
            message = f"the caller invoked the fusion more than {self.max_fusions} time(s)"
        return FusionResult(
            status=fused.status if fused else "ok",
            content=content,
            analysis=fused.analysis if fused else None,
            responses=fused.responses if fused else (),
            failed_models=fused.failed_models if fused else (),
            failure_reason=reason,
            failure_message=message,
            usage=usage,
            cost_details=costs,
            judge=self.fusion.preset.judge,
            latency_ms=round((time.monotonic() - self.started) * 1000),
            run_id=self.context.run_id,
            budget=self.budget.to_dict() if self.budget else None,
            sources=fused.sources if fused else (),
            annotations=annotations,
            unverified_citations=(fused.unverified_citations if fused else ()) + unverified,
            caller=caller,
            fused=fused is not None,
            tool_calls=own,
            finish_reason=finish,
        )


def _tool_result(result: FusionResult) -> dict[str, Any]:
    """What the caller reads back from the fusion: the analysis, the answers, the sources."""
    if result.status == "error":
        return {"error": result.failure_message, "failure_reason": result.failure_reason}
    return {
        "analysis": result.analysis,
        "responses": [{"model": r.name, "content": r.content} for r in result.responses],
        "failed_models": [f.to_dict() for f in result.failed_models],
        "sources": list(result.sources),
    }


def _refs(result: FusionResult) -> list[citations.SourceRef]:
    return [citations.SourceRef(s["number"], s["url"], s["title"]) for s in result.sources]


def _tool_prompt(call: ToolCall) -> str | None:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        return None
    prompt = arguments.get("prompt") if isinstance(arguments, dict) else None
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def _wire_choice(choice: str) -> str | dict[str, Any]:
    """``tool_choice`` as the request carries it: a mode, or one function by name."""
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _caller_reason(error: ProviderError) -> FailureReason:
    if error.reason == "rate_limited":
        return "rate_limited"
    if error.reason in ("insufficient_credits", "budget"):
        return "insufficient_credits"
    return "caller_upstream_error"
