"""A fusion, stage by stage: the panel answers, the judge analyses, the judge writes the answer.

``Fusion.stream`` yields progress events and the answer token by token; ``Fusion.run`` returns
the final ``FusionResult``. Failures of single calls are data (``MemberFailure``, a
``failure_reason``); only configuration errors raise, and they raise before any call is made.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from openfusion.engine.budget import Budget
from openfusion.engine.judge import (
    AnalysisError,
    LabelledResponse,
    analysis_schema,
    anonymise,
    parse_analysis,
)
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
)
from openfusion.errors import ConfigError, ProviderError
from openfusion.presets import Preset, load_preset
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.settings import Settings
from openfusion.types import CompletionRequest, Message, Usage

DEPTH_HEADER = "x-openrouter-fusion-depth"

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
    breaker state between fusions (the server does).
    """

    def __init__(
        self,
        preset: Preset,
        *,
        settings: Settings | None = None,
        registry: ProviderRegistry | None = None,
        prompts: PromptSet | None = None,
        caller: Caller | None = None,
        depth: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        self.preset = preset
        self.settings = settings or Settings.load()
        self._owns_registry = registry is None and caller is None
        self.registry = caller.registry if caller else registry or ProviderRegistry(self.settings)
        self.caller = caller or Caller.from_settings(self.registry, self.settings)
        self.prompts = prompts or PromptSet(
            search_dirs=[
                d for d in (self.settings.prompts_dir, self.settings.config_dir / "prompts") if d
            ],
            overrides=preset.prompts,
        )
        self.depth = depth
        self._rng = random.Random(shuffle_seed)
        self._entered = False

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
        if self._owns_registry:
            await self.registry.aclose()

    def check(self) -> None:
        """Resolve every model id of the preset now: raises ``ConfigError`` (unknown provider,
        missing API key, malformed id) before anything is spent."""
        for slot in self.preset.panel:
            for model_id in slot.models:
                self.registry.resolve(model_id)
        for model_id in self.preset.judges:
            self.registry.resolve(model_id)

    async def run(
        self,
        prompt: str | Sequence[Message],
        *,
        temperature: float | None = None,
        synthesise: bool = True,
        max_cost: float | None = None,
    ) -> FusionResult:
        """Run a whole fusion and return its result (see ``stream`` for the arguments)."""
        events = self.stream(
            prompt, temperature=temperature, synthesise=synthesise, max_cost=max_cost
        )
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
    ) -> AsyncIterator[FusionEvent]:
        """Yield progress events, the answer as ``AnswerDelta``s, and last a ``Done``.

        ``temperature`` overrides the panel's; ``synthesise=False`` stops after the analysis
        (for a caller model that writes the answer itself); ``max_cost`` (USD) is a budget: a
        call that could overrun it is not started. Closing the iterator early cancels every
        call still running.
        """
        messages = _as_messages(prompt)
        try:
            self.check()
            queue: asyncio.Queue[FusionEvent | None] = asyncio.Queue()
            budget = Budget(max_cost) if max_cost is not None else None
            run = _Run(self, messages, temperature, budget, queue.put_nowait)
            task = asyncio.create_task(run.execute(synthesise))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            try:
                while (event := await queue.get()) is not None:
                    yield event
                task.result()  # re-raise a bug in the engine rather than end quietly
            finally:
                if not task.done():
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
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
        emit: Emit,
    ) -> None:
        self.fusion = fusion
        self.preset = fusion.preset
        self.caller = fusion.caller
        self.messages = messages
        self.question = next(m.content for m in reversed(messages) if m.role == "user")
        self.temperature = temperature
        self.budget = budget
        self.emit = emit
        self.headers = {DEPTH_HEADER: str(fusion.depth + 1)}
        self.started = time.monotonic()

    async def execute(self, synthesise: bool) -> None:
        members = members_of(self.preset.panel)
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
        content = ""
        if synthesise:
            content, synthesised = await self.synthesise(labelled, analysis, responses[0].content)
            stages["synthesis"] = synthesised.usage
            error = error or synthesised.error
        failure = (_judge_reason(error.reason), error.message) if error else None
        self.finish(responses, failures, content, analysis, stages, failure)

    def finish(
        self,
        responses: tuple[MemberResponse, ...],
        failures: tuple[MemberFailure, ...],
        content: str,
        analysis: dict[str, Any] | None,
        stages: dict[str, Usage],
        failure: tuple[FailureReason, str] | None,
    ) -> None:
        error = failure is not None and failure[0] in PANEL_FAILURES
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
                    budget=self.budget.to_dict() if self.budget else None,
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
        try:
            call = await self.caller.complete(member.slot.models, request, self.budget)
            if not call.completion.content.strip():
                raise ProviderError("the model returned an empty answer", reason="empty_completion")
        except ProviderError as exc:
            elapsed = time.monotonic() - started
            self.emit(MemberEvent(member.index, member.name, "failed", elapsed, reason=exc.reason))
            return MemberFailure(
                member.slot.model,
                member.name,
                exc.reason,
                exc.status,
                exc.message,
                tries=exc.tries,
            )
        elapsed = time.monotonic() - started
        usage = call.completion.usage
        self.emit(MemberEvent(member.index, member.name, "done", elapsed, usage=usage))
        return MemberResponse(
            model=call.model,
            name=member.name,
            content=call.completion.content.strip(),
            usage=usage,
            latency_ms=round(elapsed * 1000),
        )

    def deadline(self, member: Member, waited: float) -> MemberFailure:
        elapsed = time.monotonic() - self.started
        self.emit(MemberEvent(member.index, member.name, "failed", elapsed, reason="deadline"))
        message = f"cancelled: the quorum had answered and it was {waited:.1f}s behind"
        return MemberFailure(member.slot.model, member.name, "deadline", None, message)

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
            call = await self.caller.complete(self.preset.judges, request, self.budget)
            usage = call.completion.usage
            analysis = parse_analysis(call.completion.content, labelled)
        except (ProviderError, AnalysisError) as exc:
            error = exc if isinstance(exc, AnalysisError) else _upstream(exc)
            elapsed = time.monotonic() - started
            self.emit(StageEvent("analysis", "failed", elapsed, usage, error.reason))
            return None, _Stage(usage, error)
        self.emit(StageEvent("analysis", "done", time.monotonic() - started, usage))
        return analysis, _Stage(usage)

    async def synthesise(
        self, labelled: list[LabelledResponse], analysis: dict[str, Any] | None, fallback: str
    ) -> tuple[str, _Stage]:
        self.emit(StageEvent("synthesis", "running"))
        started = time.monotonic()
        prompt = self.fusion.prompts.render(
            "synthesis",
            question=self.question,
            responses=_for_template(labelled),
            analysis=analysis,
            analysis_json=_analysis_json(analysis, labelled),
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
            async for chunk in self.caller.stream(self.preset.judges, request, self.budget):
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
    elif reasons == {"insufficient_credits"}:
        reason = "insufficient_credits"
    detail = "; ".join(f"{f.name}: {f.reason} ({f.message})" for f in failures)
    return reason, f"too few panel members answered: {detail}"


def _total(usages: Sequence[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total += usage
    return total
