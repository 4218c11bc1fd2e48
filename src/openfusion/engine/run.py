"""One fusion, stage by stage: the panel answers, the judge analyses, the judge writes the answer.

``FusionRun`` is one run's state with its stages as methods; ``RunContext`` is what every part of
a run shares (``Fusion`` builds it; the caller tier runs a ``FusionRun`` inside its own run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openfusion.engine import citations, retrieval, select
from openfusion.engine.budget import Budget
from openfusion.engine.judge import (
    AnalysisError,
    LabelledResponse,
    analysis_schema,
    anonymise,
    parse_analysis,
)
from openfusion.engine.member import MemberAnswer, answer_with_tools
from openfusion.engine.options import RunOptions, cap
from openfusion.engine.panel import Member, gather_panel, members_of
from openfusion.engine.result import (
    AnswerDelta,
    Done,
    FailureReason,
    FusionEvent,
    FusionResult,
    MemberEvent,
    MemberFailure,
    MemberResponse,
    StageEvent,
    ToolCallRecord,
    ToolEvent,
)
from openfusion.engine.trace import (
    CallObserver,
    FusionPlan,
    ModelCallEvent,
    RunTrace,
    Stage,
    ToolCallEvent,
    TraceEvent,
)
from openfusion.errors import ProviderError
from openfusion.presets import Preset
from openfusion.providers.base import Scorer
from openfusion.tools import ToolRegistry
from openfusion.types import CompletionRequest, Message, Usage

if TYPE_CHECKING:
    from openfusion.engine.fusion import Fusion

DEPTH_HEADER = "x-openrouter-fusion-depth"
JUDGE_INDEX = -1
"""``ToolEvent.index`` of the judge's own tool calls (panel members count from 0)."""

Emit = Callable[[FusionEvent], None]
log = logging.getLogger("openfusion.engine")


class Tracer:
    """Feeds a run's trace (``engine/trace.py``); one that fails is logged and dropped (the
    answer goes on). Without a trace it does nothing."""

    def __init__(self, trace: RunTrace | None, run_id: str) -> None:
        self._trace = trace
        self._run_id = run_id

    def __call__(self, event: TraceEvent) -> None:
        if self._trace is None:
            return
        try:
            self._trace.event(event)
        except Exception:
            log.exception("recording run %s failed; the rest of it is not recorded", self._run_id)
            self._trace = None

    def observer(self, stage: Stage, member: int | None = None) -> CallObserver | None:
        """What records each model call of ``stage`` (``None`` without a trace)."""
        if self._trace is None:
            return None
        return lambda record: self(ModelCallEvent(stage, member, record))


@dataclass(frozen=True, slots=True)
class _Stage:
    """The outcome of one judge call (analysis or synthesis)."""

    usage: Usage
    error: AnalysisError | None = None
    cut: bool = False
    """The answer failed after part of it had gone out: what was sent is incomplete."""


@dataclass(frozen=True, slots=True)
class RunContext:
    """What every part of one run shares."""

    fusion: Fusion
    options: RunOptions
    budget: Budget | None
    emit: Emit
    run_id: str
    tool_use: tuple[ToolRegistry | None, int]
    """The tools members may call, and how often."""
    trace: Tracer


class FusionRun:
    """One fusion's state, its stages as methods: panel → analysis → synthesis."""

    def __init__(self, context: RunContext, messages: tuple[Message, ...]) -> None:
        fusion, options = context.fusion, context.options
        self.id = context.run_id
        self.fusion = fusion
        self.preset = fusion.preset
        self.caller = fusion.caller
        self.messages = messages
        self.question = last_user(messages)
        self.options = options
        self.budget = context.budget
        self._emit = context.emit
        self.trace = context.trace
        self.started = time.monotonic()
        self.tools, self.max_tool_calls = context.tool_use
        self.timings: dict[str, float] = {}
        """Seconds per stage, as ``FusionResult.timings``."""
        self.selection: tuple[dict[str, Any], ...] = ()
        """Select mode: each candidate answer with its votes and score, best first."""
        self.passages: tuple[retrieval.Passage, ...] = ()
        """What the engine's own search found relevant (``[tools] retrieve``)."""
        self.sources: list[tuple[str, str]] = []
        """``(url, title)`` of every document a tool call of this run returned, in order."""
        self.base = CompletionRequest(
            model="",
            messages=(),
            headers={DEPTH_HEADER: str(fusion.depth + 1)},
            reasoning=options.reasoning or self.preset.reasoning,
            user=options.user,
        )
        """What every inner call of this run carries."""
        self.max_completion_tokens = (
            options.max_completion_tokens or self.preset.limits.max_completion_tokens
        )

    def emit(self, event: FusionEvent) -> None:
        self.trace(event)
        self._emit(event)

    async def execute(self, synthesise: bool) -> None:
        members = members_of(self.preset.panel)
        plan = tuple((m.index, m.name, m.slot.model) for m in members)
        self.trace(FusionPlan(self.preset.name, self.preset.judge, plan))
        for member in members:
            self.emit(MemberEvent(member.index, member.name, "waiting"))
        search = self.retrieval_tools() if self.preset.tools.retrieve else None
        if search is not None:
            with self.timed("retrieval"):
                self.passages = await retrieval.retrieve(self.question, search)
            self.sources.extend((p.url, p.title) for p in self.passages)
        with self.timed("panel"):
            outcomes = await gather_panel(members, self.ask, self.preset.policy, self.deadline)
        responses = tuple(o for o in outcomes if isinstance(o, MemberResponse))
        failures = tuple(o for o in outcomes if isinstance(o, MemberFailure))
        panel = total([o.usage for o in outcomes])
        if len(responses) < self.preset.policy.min_panel:
            self.finish(responses, failures, "", None, {"panel": panel}, _panel_failure(failures))
            return
        if self.preset.judge_mode == "select":
            await self.execute_select(responses, failures, panel, synthesise)
            return
        labelled = anonymise(responses, self.fusion._rng)
        with self.timed("analysis"):
            analysis, analysed = await self.analyse(labelled)
        stages = {"panel": panel, "analysis": analysed.usage}
        error = analysed.error
        sources = citations.number_sources(self.sources)
        content = ""
        cut: AnalysisError | None = None
        """The synthesis failed after part of the answer went out."""
        if synthesise:
            with self.timed("synthesis"):
                content, synthesised = await self.synthesise(
                    labelled, analysis, responses[0].content, sources
                )
            stages["synthesis"] = synthesised.usage
            error = error or synthesised.error
            cut = synthesised.error if synthesised.cut else None
        checked = citations.check(content, sources, responses, listing=not self.options.structured)
        if checked.content != content:  # the Sources list, streamed like the rest
            self.emit(AnswerDelta(checked.content[len(content) :]))
        failure = (_judge_reason(error.reason), error.message) if error else None
        if cut is not None:  # the client holds half an answer: say so
            failure = (
                _judge_reason(cut.reason),
                f"the answer was cut off mid-stream: {cut.message}",
            )
        self.finish(
            responses,
            failures,
            checked.content,
            analysis,
            stages,
            failure,
            checked,
            finish_reason="stop" if cut is None else "error",
        )

    async def execute_select(
        self,
        responses: tuple[MemberResponse, ...],
        failures: tuple[MemberFailure, ...],
        panel: Usage,
        synthesise: bool,
    ) -> None:
        """The judge picks an answer instead of writing one (``engine/select.py``); with a
        relevant retrieved passage, the answer quotes it."""
        self.emit(StageEvent("analysis", "running", model=self.preset.judge))
        with self.timed("analysis"):
            scored = await self.score(select.candidates(responses))
        limits = self.preset.limits
        analysis = select.analysis(self.question, scored, len(responses), limits.analysis_chars)
        sources = citations.number_sources(self.sources)
        self.emit(
            StageEvent(
                "analysis",
                "done",
                self.timings["analysis"],
                Usage(),
                model=self.preset.judge,
                analysis=analysis,
                sources=tuple(
                    {"number": s.number, "title": s.title, "url": s.url} for s in sources
                ),
            )
        )
        content = ""
        if synthesise:
            quote = retrieval.quote(self.passages, sources)
            content = quote or select.best(scored).text
            self.emit(AnswerDelta(content))
        checked = citations.check(content, sources, responses, listing=not self.options.structured)
        if checked.content != content:
            self.emit(AnswerDelta(checked.content[len(content) :]))
        stages = {"panel": panel, "analysis": Usage()}
        self.selection = tuple(
            {"answer": c.text, "votes": c.votes, "loglik": round(c.loglik, 4), "score": c.score}
            for c in sorted(scored, key=lambda c: -c.score)
        )
        self.finish(responses, failures, checked.content, analysis, stages, None, checked)

    async def score(self, found: list[select.Candidate]) -> list[select.Candidate]:
        """``found`` with the judge's likelihood of each (as they were: one candidate, or a
        judge that cannot score, needs none)."""
        if len(found) < 2:
            return found
        provider, name = self.caller.registry.resolve(self.preset.judge)
        if not isinstance(provider, Scorer):
            return found
        request = dataclasses.replace(
            self.panel_request(0), model=name, temperature=None, seed=None, max_tokens=None
        )
        try:
            logliks = await provider.loglikelihood(request, [c.text for c in found])
        except ProviderError as exc:  # agreement alone still selects
            log.warning("run %s: the judge could not score the answers: %s", self.id, exc)
            return found
        return [dataclasses.replace(c, loglik=v) for c, v in zip(found, logliks, strict=True)]

    def retrieval_tools(self) -> ToolRegistry | None:
        """The search the engine runs itself (``[tools] retrieve``): the run's, also when its
        members may make no calls themselves; none when the request turned tools off."""
        return self.tools if self.tools is not None and "web_search" in self.tools else None

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[stage] = time.monotonic() - started

    def finish(
        self,
        responses: tuple[MemberResponse, ...],
        failures: tuple[MemberFailure, ...],
        content: str,
        analysis: dict[str, Any] | None,
        stages: dict[str, Usage],
        failure: tuple[FailureReason, str] | None,
        checked: citations.Citations | None = None,
        finish_reason: str = "stop",
    ) -> None:
        error = failure is not None and failure[0] in PANEL_FAILURES
        sources = citations.number_sources(self.sources)
        self.emit(
            Done(
                FusionResult(
                    status="error" if error else "ok",
                    content=content,
                    analysis=analysis,
                    responses=responses,
                    failed_models=failures,
                    failure_reason=failure[0] if failure else None,
                    failure_message=failure[1] if failure else None,
                    usage=total(list(stages.values())),
                    cost_details={stage: usage.cost for stage, usage in stages.items()},
                    judge=self.preset.judge,
                    latency_ms=round((time.monotonic() - self.started) * 1000),
                    run_id=self.id,
                    budget=self.budget.to_dict() if self.budget else None,
                    sources=tuple(
                        {"number": s.number, "title": s.title, "url": s.url} for s in sources
                    ),
                    annotations=checked.annotations if checked else (),
                    unverified_citations=checked.unverified if checked else (),
                    finish_reason=finish_reason,
                    timings=dict(self.timings),
                    selection=self.selection,
                )
            )
        )

    # -- panel ---------------------------------------------------------------------------

    async def ask(self, member: Member) -> MemberResponse | MemberFailure:
        self.emit(MemberEvent(member.index, member.name, "running"))
        started = time.monotonic()
        request = self.panel_request(member.index)

        def on_tool(call: ToolCallRecord, started: float) -> None:
            ok = call.error is None
            self.emit(ToolEvent(member.index, member.name, call.name, call.arguments, ok))
            self.trace(ToolCallEvent(member.index, call, started, time.monotonic()))

        answer = await answer_with_tools(
            self.caller,
            member.slot.models,
            request,
            self.tools,
            self.max_tool_calls,
            first_call_required=self.preset.tools.first_call == "required",
            budget=self.budget,
            on_tool=on_tool,
            observe=self.trace.observer("panel", member.index),
        )
        error = answer.error
        content = select.clean(answer.content)
        if error is None and not answer.content.strip():
            error = ProviderError("the model returned an empty answer", reason="empty_completion")
        elif error is None and not content:
            error = ProviderError(
                f"the model wrote a tool call as text, not an answer: {answer.content[:200]}",
                reason="not_an_answer",
            )
        elapsed = time.monotonic() - started
        if error is not None:  # what the member spent before failing still counts
            failure = MemberFailure(
                member.slot.model,
                member.name,
                error.reason,
                error.status,
                error.message,
                usage=answer.usage,
                tries=error.tries,
            )
            self.emit(
                MemberEvent(
                    member.index,
                    member.name,
                    "failed",
                    elapsed,
                    answer.usage,
                    error.reason,
                    outcome=failure,
                )
            )
            return failure
        self.sources.extend((s.url, s.title) for s in answer.sources)
        response = MemberResponse(
            model=answer.model,
            name=member.name,
            content=content,
            usage=answer.usage,
            latency_ms=round(elapsed * 1000),
            tool_calls=answer.tool_calls,
        )
        self.emit(
            MemberEvent(
                member.index, member.name, "done", elapsed, usage=answer.usage, outcome=response
            )
        )
        return response

    def panel_request(self, index: int) -> CompletionRequest:
        """What panel member ``index`` is asked (the judge's select mode scores answers
        against the same prompt)."""
        slot = self.preset.panel[index]
        system = self.fusion.prompts.render(
            "panel_system",
            question=self.question,
            member_index=index,
            panel_size=len(self.preset.panel),
            tools=list(self.tools.names) if self.tools and self.max_tool_calls else [],
        )
        seed = slot.seed if self.options.seed is None else self.options.seed + index
        request = self.options.sampling(
            dataclasses.replace(
                self.base,
                messages=(Message("system", system), *self.messages),
                seed=seed,
                max_tokens=cap(self.preset.limits.panel_max_tokens, self.max_completion_tokens),
            )
        )
        return dataclasses.replace(
            request, temperature=panel_temperature(self.preset, index, self.options.temperature)
        )

    def deadline(self, member: Member, waited: float) -> MemberFailure:
        elapsed = time.monotonic() - self.started
        message = f"cancelled: the quorum had answered and it was {waited:.1f}s behind"
        failure = MemberFailure(member.slot.model, member.name, "deadline", None, message)
        self.emit(
            MemberEvent(
                member.index, member.name, "failed", elapsed, reason="deadline", outcome=failure
            )
        )
        return failure

    # -- judge ---------------------------------------------------------------------------

    async def analyse(
        self, labelled: list[LabelledResponse]
    ) -> tuple[dict[str, Any] | None, _Stage]:
        judge = self.preset.judge
        self.emit(StageEvent("analysis", "running", model=judge))
        started = time.monotonic()
        labels = [item.label for item in labelled]
        limits = self.preset.limits
        tools = self.tools if self.preset.tools.judge and self.max_tool_calls else None
        prompt = self.fusion.prompts.render(
            "judge_analysis",
            question=self.question,
            responses=_for_template(labelled),
            labels=labels,
            tools=list(tools.names) if tools else [],
        )
        request = dataclasses.replace(
            self.base,
            messages=(Message("user", prompt),),
            temperature=0.0,  # whatever the request says: the analysis is not sampled
            max_tokens=cap(limits.analysis_max_tokens, self.max_completion_tokens),
            json_schema=analysis_schema(labels, limits.analysis_items, limits.analysis_chars),
        )
        answer = await self.judge_answer(request, tools)
        usage = answer.usage
        ended = StageEvent(
            "analysis",
            "done",
            usage=usage,
            model=answer.model,
            sources=tuple(
                {"number": s.number, "title": s.title, "url": s.url}
                for s in citations.number_sources(self.sources)
            ),
        )
        try:
            if answer.error is not None:
                raise _upstream(answer.error)
            analysis = parse_analysis(answer.content, labelled)
        except AnalysisError as error:
            elapsed = time.monotonic() - started
            self.emit(
                dataclasses.replace(ended, state="failed", elapsed=elapsed, reason=error.reason)
            )
            return None, _Stage(usage, error)
        elapsed = time.monotonic() - started
        self.emit(dataclasses.replace(ended, elapsed=elapsed, analysis=analysis))
        return analysis, _Stage(usage)

    async def judge_answer(
        self, request: CompletionRequest, tools: ToolRegistry | None
    ) -> MemberAnswer:
        """The judge's analysis; with ``tools``, after it checked what it wanted to."""

        def on_tool(call: ToolCallRecord, started: float) -> None:
            ok = call.error is None
            self.emit(ToolEvent(JUDGE_INDEX, "judge", call.name, call.arguments, ok))
            self.trace(ToolCallEvent(JUDGE_INDEX, call, started, time.monotonic()))

        answer = await answer_with_tools(
            self.caller,
            self.preset.judges,
            request,
            tools,
            self.max_tool_calls,
            budget=self.budget,
            on_tool=on_tool,
            observe=self.trace.observer("analysis"),
        )
        self.sources.extend((s.url, s.title) for s in answer.sources)
        return answer

    async def synthesise(
        self,
        labelled: list[LabelledResponse],
        analysis: dict[str, Any] | None,
        fallback: str,
        sources: list[citations.SourceRef],
    ) -> tuple[str, _Stage]:
        self.emit(StageEvent("synthesis", "running", model=self.preset.judge))
        started = time.monotonic()
        prompt = self.fusion.prompts.render(
            "synthesis",
            question=self.question,
            responses=_for_template(labelled),
            analysis=analysis,
            analysis_json=_analysis_json(analysis, labelled),
            sources=[{"number": s.number, "title": s.title, "url": s.url} for s in sources],
        )
        request = self.options.answer(
            dataclasses.replace(
                self.base,
                messages=(Message("user", prompt),),
                max_tokens=cap(self.preset.limits.synthesis_max_tokens, self.max_completion_tokens),
            )
        )
        parts: list[str] = []
        usage = Usage()
        error: AnalysisError | None = None
        try:
            stream = self.caller.stream(
                self.preset.judges, request, self.budget, observe=self.trace.observer("synthesis")
            )
            async for chunk in stream:
                if chunk.delta and (parts or chunk.delta.strip()):
                    delta = chunk.delta if parts else chunk.delta.lstrip()
                    parts.append(delta)
                    self.emit(AnswerDelta(delta))
                usage = chunk.usage or usage
        except ProviderError as exc:
            error = _upstream(exc)
            usage = exc.usage or usage  # a cut stream is billed for the text it sent
        if error is None and not "".join(parts).strip():
            error = AnalysisError("judge_empty_completion", "the judge wrote an empty answer")
        elapsed = time.monotonic() - started
        if error is not None:
            self.emit(StageEvent("synthesis", "failed", elapsed, usage, error.reason))
            if not parts:  # best effort: the first panel answer stands in for the fused one
                parts.append(fallback)
                self.emit(AnswerDelta(fallback))
                return "".join(parts), _Stage(usage, error)
            return "".join(parts), _Stage(usage, error, cut=True)
        self.emit(StageEvent("synthesis", "done", elapsed, usage))
        return "".join(parts).strip(), _Stage(usage)


PANEL_FAILURES = frozenset({"all_panels_failed", "rate_limited", "insufficient_credits"})


def panel_temperature(preset: Preset, index: int, requested: float | None) -> float | None:
    """Member ``index``'s temperature: the request's sets the base and the preset's spread
    stays (with temperatures 0.0, 0.7, 1.0 and a request at 0.2: 0.2, 0.9, 1.2), so a
    request at 0 still gets distinct samples from a panel of one model. At most 2."""
    own = preset.panel[index].temperature
    if requested is None:
        return own
    given = [s.temperature for s in preset.panel if s.temperature is not None]
    spread = own - min(given) if own is not None else 0.0
    return min(2.0, requested + spread)


def last_user(messages: Sequence[Message]) -> str:
    """The text of the last user message: the question."""
    return next(m.content for m in reversed(messages) if m.role == "user")


def _for_template(labelled: list[LabelledResponse]) -> list[dict[str, str]]:
    return [{"label": item.label, "content": item.content} for item in labelled]


def _analysis_json(analysis: dict[str, Any] | None, labelled: list[LabelledResponse]) -> str:
    """The analysis as the judge wrote it: with labels, since the synthesis prompt is anonymous."""
    if analysis is None:
        return ""
    text = json.dumps(analysis, ensure_ascii=False)
    for item in labelled:
        text = text.replace(json.dumps(item.member.name), json.dumps(item.label))
    return text


def _upstream(exc: ProviderError) -> AnalysisError:
    return AnalysisError("judge_upstream_error", f"{exc.reason}: {exc.message}")


def _judge_reason(reason: str) -> FailureReason:
    reasons: dict[str, FailureReason] = {
        "judge_not_valid_json": "judge_not_valid_json",
        "judge_schema_mismatch": "judge_schema_mismatch",
        "judge_empty_completion": "judge_empty_completion",
    }
    return reasons.get(reason, "judge_upstream_error")


def _panel_failure(failures: Sequence[MemberFailure]) -> tuple[FailureReason, str]:
    reasons = {f.reason for f in failures}
    reason: FailureReason = "all_panels_failed"
    if reasons == {"rate_limited"}:
        reason = "rate_limited"
    elif reasons and reasons <= {"insufficient_credits", "budget"}:
        reason = "insufficient_credits"  # out of credits upstream, or out of max_cost here
    detail = "; ".join(f"{f.name}: {f.reason} ({f.message})" for f in failures)
    return reason, f"too few panel members answered: {detail}"


def total(usages: Sequence[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total += usage
    return total
