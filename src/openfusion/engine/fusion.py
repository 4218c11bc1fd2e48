"""A fusion, stage by stage: the panel answers, the judge analyses, the judge writes the answer.

``Fusion.stream`` yields progress events and the answer token by token; ``Fusion.run`` returns
the final ``FusionResult``. Failures of single calls are data (``MemberFailure``, a
``failure_reason``); only configuration errors raise, and they raise before any call is made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from openfusion.engine import citations
from openfusion.engine.budget import Budget
from openfusion.engine.judge import (
    AnalysisError,
    LabelledResponse,
    analysis_schema,
    anonymise,
    parse_analysis,
)
from openfusion.engine.member import answer_with_tools
from openfusion.engine.panel import Member, gather_panel, members_of
from openfusion.engine.policy import Caller
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
    DEFAULT,
    CallObserver,
    FusionPlan,
    ModelCallEvent,
    RunEnd,
    RunRecorder,
    RunStart,
    RunTrace,
    RunTraceHandle,
    Stage,
    ToolCallEvent,
    TraceEvent,
    UseDefault,
)
from openfusion.errors import ConfigError, ProviderError
from openfusion.presets import MAX_TOOL_CALLS, Preset, ToolUse, load_preset
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.settings import Settings, describe_validation_error
from openfusion.tools import ToolRegistry, ToolSettings, corpus_path, default_tools
from openfusion.types import CompletionRequest, Message, Usage

DEPTH_HEADER = "x-openrouter-fusion-depth"

log = logging.getLogger(__name__)

Emit = Callable[[FusionEvent], None]


@dataclass(frozen=True, slots=True)
class _Stage:
    """The outcome of one judge call (analysis or synthesis)."""

    usage: Usage
    error: AnalysisError | None = None


class Fusion:
    """Runs fusions for one preset. Use as ``async with`` to keep providers (and the local
    model) loaded across runs; used bare, each run closes what it opened.

    ``caller`` carries retries, fallbacks, the circuit breaker and prices; pass one to share
    breaker state between fusions (the server does). ``recorder`` records each run: by default
    to the store the settings name (``[store] record``, on unless turned off); ``None`` records
    nothing.
    """

    def __init__(
        self,
        preset: Preset,
        *,
        settings: Settings | None = None,
        registry: ProviderRegistry | None = None,
        prompts: PromptSet | None = None,
        caller: Caller | None = None,
        tools: ToolRegistry | None = None,
        depth: int = 0,
        shuffle_seed: int | None = None,
        recorder: RunRecorder | UseDefault | None = DEFAULT,
    ) -> None:
        self.preset = preset
        self.settings = settings or Settings.load()
        self._owns_registry = registry is None and caller is None
        self.registry = caller.registry if caller else registry or ProviderRegistry(self.settings)
        self.caller = caller or Caller.from_settings(self.registry, self.settings)
        self.prompts = prompts or PromptSet(self.settings.prompt_dirs, preset.prompts)
        self.depth = depth
        self._rng = random.Random(shuffle_seed)
        self._entered = False
        self._available = tools
        self._recorder_choice = recorder
        self._default_recorder: RunRecorder | None = None
        self._close_lock = asyncio.Lock()

    @property
    def tools(self) -> ToolRegistry | None:
        """The tools panel members may call: of the available ones (the registry given, else
        the configured built-ins), those the preset allows — ``web_search`` on the corpus only
        once ``openfusion index`` has built it. ``None`` when there are none."""
        use = self.preset.tools
        if not use.enabled or use.max_tool_calls == 0:
            return None
        if self._available is None:
            self._available = configured_tools(self.settings)
        return select_tools(self._available, use, self.settings)

    @classmethod
    def from_preset(
        cls, name: str | None = None, *, settings: Settings | None = None, **kwargs: Any
    ) -> Fusion:
        """``name`` is a preset name or ``self:<model>``; ``None`` picks the default preset."""
        settings = settings or Settings.load()
        return cls(load_preset(name or settings.preset_name, settings), settings=settings, **kwargs)

    async def __aenter__(self) -> Fusion:
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        await self.aclose()

    async def aclose(self) -> None:
        async with self._close_lock:  # a second close waits for the first
            if self._owns_registry:
                await self.registry.aclose()
            if self._default_recorder is not None:
                recorder, self._default_recorder = self._default_recorder, None
                await recorder.aclose()

    @property
    def recorder(self) -> RunRecorder | None:
        """Where runs are recorded (``None``: nowhere)."""
        if self._recorder_choice is not DEFAULT:
            return self._recorder_choice
        if self._default_recorder is None and self.settings.store.record:
            from openfusion.store.recorder import StoreRecorder  # the store holds the SQL

            self._default_recorder = StoreRecorder.for_settings(self.settings, source="library")
        return self._default_recorder

    def check(self) -> None:
        """Resolve every model id of the preset now: raises ``ConfigError`` (unknown provider,
        missing API key, malformed id) before anything is spent."""
        for slot in self.preset.panel:
            for model_id in slot.models:
                self.registry.resolve(model_id)
        for model_id in self.preset.judges:
            self.registry.resolve(model_id)
        _ = self.tools  # a bad [tools] setting (a search backend without its key) fails now

    async def run(
        self,
        prompt: str | Sequence[Message],
        *,
        temperature: float | None = None,
        synthesise: bool = True,
        max_cost: float | None = None,
        tools: Sequence[str] | None = None,
        max_tool_calls: int | None = None,
        run_id: str | None = None,
        trace: RunTrace | None = None,
        budget: Budget | None = None,
    ) -> FusionResult:
        """Run a whole fusion and return its result (see ``stream`` for the arguments)."""
        events = self.stream(
            prompt,
            temperature=temperature,
            synthesise=synthesise,
            max_cost=max_cost,
            tools=tools,
            max_tool_calls=max_tool_calls,
            run_id=run_id,
            trace=trace,
            budget=budget,
        )
        async with aclosing(events):  # its cleanup (and the run's record) before we return
            async for event in events:
                if isinstance(event, Done):
                    return event.result
        raise RuntimeError("fusion ended without a result")  # pragma: no cover - a bug if reached

    async def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        temperature: float | None = None,
        synthesise: bool = True,
        max_cost: float | None = None,
        tools: Sequence[str] | None = None,
        max_tool_calls: int | None = None,
        run_id: str | None = None,
        trace: RunTrace | None = None,
        budget: Budget | None = None,
    ) -> AsyncGenerator[FusionEvent, None]:
        """Yield progress events, the answer as ``AnswerDelta``s, and last a ``Done``.

        ``temperature`` overrides the panel's; ``synthesise=False`` stops after the analysis
        (for a caller model that writes the answer itself); ``max_cost`` (USD) is a budget: a
        call that could overrun it is not started; ``tools`` names the tools members may use
        (``[]``: none) and ``max_tool_calls`` caps their calls (at most 16); ``run_id`` names the
        run (default: a new random id); ``budget`` is a limit shared with other runs (an eval's
        ``--max-cost``), used instead of ``max_cost``. ``trace`` receives everything the run
        does (see ``engine/trace.py``); without one, the run is recorded by ``recorder``.
        Closing the iterator early cancels every call still running.
        """
        messages = _as_messages(prompt)
        try:
            self.check()
            queue: asyncio.Queue[FusionEvent | None] = asyncio.Queue()
            if budget is None and max_cost is not None:
                budget = Budget(max_cost)
            registry = self.tools if tools is None else _subset(self.tools, tools)
            calls = self.preset.tools.max_tool_calls if max_tool_calls is None else max_tool_calls
            tool_use = (registry, min(calls, MAX_TOOL_CALLS))
            run_id = run_id or uuid.uuid4().hex
            options = {"temperature": temperature, "max_cost": max_cost, "tools": tools}
            options |= {"max_tool_calls": max_tool_calls, "synthesise": synthesise}
            own: RunTraceHandle | None = None
            if trace is None and self.recorder is not None:
                start = RunStart(run_id, "fusion", messages, f"openfusion/{self.preset.name}")
                trace = own = self.recorder.start_run(dataclasses.replace(start, options=options))
            run = _Run(self, messages, temperature, budget, tool_use, queue.put_nowait, run_id)
            run.trace = trace
            task = asyncio.create_task(run.execute(synthesise))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            end = RunEnd("cancelled")
            try:
                while (event := await queue.get()) is not None:
                    if isinstance(event, Done):
                        end = RunEnd.of(event.result)
                    yield event
                task.result()  # re-raise a bug in the engine rather than end quietly
            except Exception as exc:
                end = RunEnd("error", failure_message=f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if not task.done():
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
                if own is not None:
                    own.finish(end)
        finally:
            if not self._entered:
                await self.aclose()


class _Run:
    """One fusion's state, its stages as methods: panel → analysis → synthesis."""

    def __init__(
        self,
        fusion: Fusion,
        messages: tuple[Message, ...],
        temperature: float | None,
        budget: Budget | None,
        tool_use: tuple[ToolRegistry | None, int],
        emit: Emit,
        run_id: str,
    ) -> None:
        self.id = run_id
        self.fusion = fusion
        self.preset = fusion.preset
        self.caller = fusion.caller
        self.messages = messages
        self.question = next(m.content for m in reversed(messages) if m.role == "user")
        self.temperature = temperature
        self.budget = budget
        self._emit = emit
        self.headers = {DEPTH_HEADER: str(fusion.depth + 1)}
        self.started = time.monotonic()
        self.tools, self.max_tool_calls = tool_use
        self.sources: list[tuple[str, str]] = []
        """``(url, title)`` of every document a member's tool call returned, in order."""
        self.trace: RunTrace | None = None

    def emit(self, event: FusionEvent) -> None:
        self.record(event)
        self._emit(event)

    def record(self, event: TraceEvent) -> None:
        """Feed the trace; one that fails is logged and dropped (the answer goes on)."""
        if self.trace is None:
            return
        try:
            self.trace.event(event)
        except Exception:
            log.exception("recording run %s failed; the rest of it is not recorded", self.id)
            self.trace = None

    def observer(self, stage: Stage, member: int | None = None) -> CallObserver | None:
        if self.trace is None:
            return None
        return lambda record: self.record(ModelCallEvent(stage, member, record))

    async def execute(self, synthesise: bool) -> None:
        members = members_of(self.preset.panel)
        plan = tuple((m.index, m.name, m.slot.model) for m in members)
        self.record(FusionPlan(self.preset.name, self.preset.judge, plan))
        for member in members:
            self.emit(MemberEvent(member.index, member.name, "waiting"))
        outcomes = await gather_panel(members, self.ask, self.preset.policy, self.deadline)
        responses = tuple(o for o in outcomes if isinstance(o, MemberResponse))
        failures = tuple(o for o in outcomes if isinstance(o, MemberFailure))
        panel = _total([o.usage for o in outcomes])
        if len(responses) < self.preset.policy.min_panel:
            self.finish(responses, failures, "", None, {"panel": panel}, _panel_failure(failures))
            return
        labelled = anonymise(responses, self.fusion._rng)
        analysis, analysed = await self.analyse(labelled)
        stages = {"panel": panel, "analysis": analysed.usage}
        error = analysed.error
        sources = citations.number_sources(self.sources)
        content = ""
        if synthesise:
            content, synthesised = await self.synthesise(
                labelled, analysis, responses[0].content, sources
            )
            stages["synthesis"] = synthesised.usage
            error = error or synthesised.error
        checked = citations.check(content, sources, responses)
        if checked.content != content:  # the Sources list, streamed like the rest
            self.emit(AnswerDelta(checked.content[len(content) :]))
        if analysis is not None and checked.unverified:
            analysis["unverified_citations"] = list(checked.unverified)
        failure = (_judge_reason(error.reason), error.message) if error else None
        self.finish(responses, failures, checked.content, analysis, stages, failure, checked)

    def finish(
        self,
        responses: tuple[MemberResponse, ...],
        failures: tuple[MemberFailure, ...],
        content: str,
        analysis: dict[str, Any] | None,
        stages: dict[str, Usage],
        failure: tuple[FailureReason, str] | None,
        checked: citations.Citations | None = None,
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
                    usage=_total(list(stages.values())),
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
                )
            )
        )

    # -- panel ---------------------------------------------------------------------------

    async def ask(self, member: Member) -> MemberResponse | MemberFailure:
        self.emit(MemberEvent(member.index, member.name, "running"))
        started = time.monotonic()
        system = self.fusion.prompts.render(
            "panel_system",
            question=self.question,
            member_index=member.index,
            panel_size=len(self.preset.panel),
            tools=list(self.tools.names) if self.tools and self.max_tool_calls else [],
        )
        request = CompletionRequest(
            model="",
            messages=(Message("system", system), *self.messages),
            temperature=self.temperature
            if self.temperature is not None
            else member.slot.temperature,
            seed=member.slot.seed,
            max_tokens=self.preset.limits.panel_max_tokens,
            headers=self.headers,
        )

        def on_tool(call: ToolCallRecord, started: float) -> None:
            ok = call.error is None
            self.emit(ToolEvent(member.index, member.name, call.name, call.arguments, ok))
            self.record(ToolCallEvent(member.index, call, started, time.monotonic()))

        answer = await answer_with_tools(
            self.caller,
            member.slot.models,
            request,
            self.tools,
            self.max_tool_calls,
            first_call_required=self.preset.tools.first_call == "required",
            budget=self.budget,
            on_tool=on_tool,
            observe=self.observer("panel", member.index),
        )
        error = answer.error
        if error is None and not answer.content.strip():
            error = ProviderError("the model returned an empty answer", reason="empty_completion")
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
            content=answer.content.strip(),
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
        self.emit(StageEvent("analysis", "running"))
        started = time.monotonic()
        labels = [item.label for item in labelled]
        limits = self.preset.limits
        prompt = self.fusion.prompts.render(
            "judge_analysis",
            question=self.question,
            responses=_for_template(labelled),
            labels=labels,
        )
        request = CompletionRequest(
            model="",
            messages=(Message("user", prompt),),
            temperature=0.0,
            max_tokens=limits.analysis_max_tokens,
            json_schema=analysis_schema(labels, limits.analysis_items, limits.analysis_chars),
            headers=self.headers,
        )
        usage = Usage()
        try:
            call = await self.caller.complete(
                self.preset.judges, request, self.budget, observe=self.observer("analysis")
            )
            usage = call.completion.usage
            analysis = parse_analysis(call.completion.content, labelled)
        except (ProviderError, AnalysisError) as exc:
            error = exc if isinstance(exc, AnalysisError) else _upstream(exc)
            elapsed = time.monotonic() - started
            self.emit(StageEvent("analysis", "failed", elapsed, usage, error.reason))
            return None, _Stage(usage, error)
        elapsed = time.monotonic() - started
        self.emit(StageEvent("analysis", "done", elapsed, usage, analysis=analysis))
        return analysis, _Stage(usage)

    async def synthesise(
        self,
        labelled: list[LabelledResponse],
        analysis: dict[str, Any] | None,
        fallback: str,
        sources: list[citations.SourceRef],
    ) -> tuple[str, _Stage]:
        self.emit(StageEvent("synthesis", "running"))
        started = time.monotonic()
        prompt = self.fusion.prompts.render(
            "synthesis",
            question=self.question,
            responses=_for_template(labelled),
            analysis=analysis,
            analysis_json=_analysis_json(analysis, labelled),
            sources=[{"number": s.number, "title": s.title, "url": s.url} for s in sources],
        )
        request = CompletionRequest(
            model="",
            messages=(Message("user", prompt),),
            max_tokens=self.preset.limits.synthesis_max_tokens,
            headers=self.headers,
        )
        parts: list[str] = []
        usage = Usage()
        error: AnalysisError | None = None
        try:
            stream = self.caller.stream(
                self.preset.judges, request, self.budget, observe=self.observer("synthesis")
            )
            async for chunk in stream:
                if chunk.delta and (parts or chunk.delta.strip()):
                    delta = chunk.delta if parts else chunk.delta.lstrip()
                    parts.append(delta)
                    self.emit(AnswerDelta(delta))
                usage = chunk.usage or usage
        except ProviderError as exc:
            error = _upstream(exc)
        if error is None and not "".join(parts).strip():
            error = AnalysisError("judge_empty_completion", "the judge wrote an empty answer")
        elapsed = time.monotonic() - started
        if error is not None:
            self.emit(StageEvent("synthesis", "failed", elapsed, usage, error.reason))
            if not parts:  # best effort: the first panel answer stands in for the fused one
                parts.append(fallback)
                self.emit(AnswerDelta(fallback))
            return "".join(parts), _Stage(usage, error)
        self.emit(StageEvent("synthesis", "done", elapsed, usage))
        return "".join(parts).strip(), _Stage(usage)


PANEL_FAILURES = frozenset({"all_panels_failed", "rate_limited", "insufficient_credits"})


def tool_settings(settings: Settings) -> ToolSettings:
    try:
        return ToolSettings.model_validate(dict(settings.tools))
    except ValidationError as exc:
        raise ConfigError(f"[tools] in config.toml: {describe_validation_error(exc)}") from exc


def configured_tools(settings: Settings) -> ToolRegistry:
    """The built-in tools as ``[tools]`` in config.toml sets them up (build once, share)."""
    return default_tools(settings, tool_settings(settings))


def select_tools(available: ToolRegistry, use: ToolUse, settings: Settings) -> ToolRegistry | None:
    """The tools of ``available`` that ``use`` allows: ``web_search`` on the corpus only once
    ``openfusion index`` has built it. ``None`` when there are none."""
    if not use.enabled or use.max_tool_calls == 0:
        return None
    names = [n for n in available.names if use.allow is None or n in use.allow]
    if "web_search" in names and not _corpus_ready(settings):
        names.remove("web_search")  # nothing to search yet: `openfusion index PATH`
    return _subset(available, names)


def _corpus_ready(settings: Settings) -> bool:
    config = tool_settings(settings)
    return config.search_backend != "corpus" or corpus_path(settings, config).exists()


def _subset(registry: ToolRegistry | None, names: Sequence[str]) -> ToolRegistry | None:
    """The registry's tools named in ``names`` (unknown names are ignored); None if none."""
    if registry is None:
        return None
    subset = ToolRegistry(output_max_chars=registry.output_max_chars)
    for tool in registry:
        if tool.name in names:
            subset.register(tool)
    return subset if len(subset) else None


def _as_messages(prompt: str | Sequence[Message]) -> tuple[Message, ...]:
    messages = (Message("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    if not any(m.role == "user" and m.content.strip() for m in messages):
        raise ConfigError("a fusion needs a non-empty user message")
    return messages


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


def _total(usages: Sequence[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total += usage
    return total
