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
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from openfusion.engine.judge import (
    AnalysisError,
    LabelledResponse,
    analysis_schema,
    anonymise,
    parse_analysis,
)
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
from openfusion.presets import PanelSlot, Preset, load_preset
from openfusion.prompts import PromptSet
from openfusion.providers import Provider, ProviderRegistry
from openfusion.settings import Settings
from openfusion.types import CompletionRequest, Message, Usage

DEPTH_HEADER = "x-openrouter-fusion-depth"

Emit = Callable[[FusionEvent], None]


@dataclass(frozen=True, slots=True)
class _Member:
    index: int
    name: str
    slot: PanelSlot
    provider: Provider
    model: str


@dataclass(frozen=True, slots=True)
class _Stage:
    """The outcome of one judge call (analysis or synthesis)."""

    usage: Usage
    error: AnalysisError | None = None


class Fusion:
    """Runs fusions for one preset. Use as ``async with`` to keep providers (and the local
    model) loaded across runs; used bare, each run closes what it opened."""

    def __init__(
        self,
        preset: Preset,
        *,
        settings: Settings | None = None,
        registry: ProviderRegistry | None = None,
        prompts: PromptSet | None = None,
        depth: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        self.preset = preset
        self.settings = settings or Settings.load()
        self._owns_registry = registry is None
        self.registry = registry or ProviderRegistry(self.settings)
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

    async def run(
        self,
        prompt: str | Sequence[Message],
        *,
        temperature: float | None = None,
        synthesise: bool = True,
    ) -> FusionResult:
        """Run a whole fusion and return its result (see ``stream`` for the arguments)."""
        async for event in self.stream(prompt, temperature=temperature, synthesise=synthesise):
            if isinstance(event, Done):
                return event.result
        raise RuntimeError("fusion ended without a result")  # pragma: no cover - a bug if reached

    async def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        temperature: float | None = None,
        synthesise: bool = True,
    ) -> AsyncIterator[FusionEvent]:
        """Yield progress events, the answer as ``AnswerDelta``s, and last a ``Done``.

        ``temperature`` overrides the panel's; ``synthesise=False`` stops after the analysis
        (for a caller model that writes the answer itself). Closing the iterator early cancels
        every call still running.
        """
        messages = _as_messages(prompt)
        try:
            members = self._resolve_panel()
            judge, judge_model = self.registry.resolve(self.preset.judge)
            queue: asyncio.Queue[FusionEvent | None] = asyncio.Queue()
            task = asyncio.create_task(
                self._run(
                    messages,
                    members,
                    (judge, judge_model),
                    temperature,
                    synthesise,
                    queue.put_nowait,
                )
            )
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

    def check(self) -> None:
        """Resolve every model id of the preset now: raises ``ConfigError`` (unknown provider,
        missing API key, malformed id) before anything is spent."""
        self._resolve_panel()
        self.registry.resolve(self.preset.judge)

    def _resolve_panel(self) -> list[_Member]:
        counts = Counter(slot.model for slot in self.preset.panel)
        seen: Counter[str] = Counter()
        members = []
        for index, slot in enumerate(self.preset.panel):
            seen[slot.model] += 1
            name = slot.model if counts[slot.model] == 1 else f"{slot.model}#{seen[slot.model]}"
            provider, model = self.registry.resolve(slot.model)
            members.append(_Member(index, name, slot, provider, model))
        return members

    @property
    def _inner_headers(self) -> dict[str, str]:
        return {DEPTH_HEADER: str(self.depth + 1)}

    async def _run(
        self,
        messages: tuple[Message, ...],
        members: list[_Member],
        judge_ref: tuple[Provider, str],
        temperature: float | None,
        synthesise: bool,
        emit: Emit,
    ) -> None:
        judge, judge_model = judge_ref
        started = time.monotonic()
        question = next(m.content for m in reversed(messages) if m.role == "user")

        for member in members:
            emit(MemberEvent(member.index, member.name, "waiting"))
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._ask_member(m, messages, question, temperature, emit))
                for m in members
            ]
        outcomes = [t.result() for t in tasks]
        responses = tuple(o for o in outcomes if isinstance(o, MemberResponse))
        failures = tuple(o for o in outcomes if isinstance(o, MemberFailure))
        panel_usage = _total([o.usage for o in outcomes])

        def finish(
            status: str, content: str, analysis: dict[str, Any] | None, stages: list[_Stage]
        ) -> None:
            usages = [panel_usage, *(s.usage for s in stages)]
            error = next((s.error for s in stages if s.error), None)
            reason: FailureReason | None = _judge_reason(error.reason) if error else None
            message = error.message if error else None
            if status == "error":
                reason, message = _panel_failure(failures)
            emit(
                Done(
                    FusionResult(
                        status="ok" if status == "ok" else "error",
                        content=content,
                        analysis=analysis,
                        responses=responses,
                        failed_models=failures,
                        failure_reason=reason,
                        failure_message=message,
                        usage=_total(usages),
                        cost_details=dict(
                            zip(
                                ("panel", "analysis", "synthesis"),
                                (u.cost for u in usages),
                                strict=False,
                            )
                        ),
                        judge=self.preset.judge,
                        latency_ms=_ms_since(started),
                    )
                )
            )

        if not responses:
            finish("error", "", None, [])
            return
        labelled = anonymise(responses, self._rng)
        analysis, analysed = await self._analyse(judge, judge_model, question, labelled, emit)
        if not synthesise:
            finish("ok", "", analysis, [analysed])
            return
        content, synthesised = await self._synthesise(
            judge, judge_model, question, labelled, analysis, responses[0].content, emit
        )
        finish("ok", content, analysis, [analysed, synthesised])

    async def _ask_member(
        self,
        member: _Member,
        messages: tuple[Message, ...],
        question: str,
        temperature: float | None,
        emit: Emit,
    ) -> MemberResponse | MemberFailure:
        emit(MemberEvent(member.index, member.name, "running"))
        started = time.monotonic()
        system = self.prompts.render(
            "panel_system",
            question=question,
            member_index=member.index,
            panel_size=len(self.preset.panel),
        )
        request = CompletionRequest(
            model=member.model,
            messages=(Message("system", system), *messages),
            temperature=temperature if temperature is not None else member.slot.temperature,
            seed=member.slot.seed,
            max_tokens=self.preset.limits.panel_max_tokens,
            headers=self._inner_headers,
        )
        try:
            completion = await member.provider.complete(request)
            if not completion.content.strip():
                raise ProviderError("the model returned an empty answer", reason="empty_completion")
        except ProviderError as exc:
            emit(
                MemberEvent(
                    member.index,
                    member.name,
                    "failed",
                    time.monotonic() - started,
                    reason=exc.reason,
                )
            )
            return MemberFailure(
                member.slot.model, member.name, exc.reason, exc.status, exc.message
            )
        elapsed = time.monotonic() - started
        emit(MemberEvent(member.index, member.name, "done", elapsed, usage=completion.usage))
        return MemberResponse(
            model=member.slot.model,
            name=member.name,
            content=completion.content.strip(),
            usage=completion.usage,
            latency_ms=round(elapsed * 1000),
        )

    async def _analyse(
        self,
        judge: Provider,
        judge_model: str,
        question: str,
        labelled: list[LabelledResponse],
        emit: Emit,
    ) -> tuple[dict[str, Any] | None, _Stage]:
        emit(StageEvent("analysis", "running"))
        started = time.monotonic()
        labels = [item.label for item in labelled]
        prompt = self.prompts.render(
            "judge_analysis", question=question, responses=_for_template(labelled), labels=labels
        )
        request = CompletionRequest(
            model=judge_model,
            messages=(Message("user", prompt),),
            temperature=0.0,
            max_tokens=self.preset.limits.analysis_max_tokens,
            json_schema=analysis_schema(
                labels, self.preset.limits.analysis_items, self.preset.limits.analysis_chars
            ),
            headers=self._inner_headers,
        )
        usage = Usage()
        try:
            completion = await judge.complete(request)
            usage = completion.usage
            analysis = parse_analysis(completion.content, labelled)
        except (ProviderError, AnalysisError) as exc:
            error = exc if isinstance(exc, AnalysisError) else _upstream(exc)
            emit(StageEvent("analysis", "failed", time.monotonic() - started, usage, error.reason))
            return None, _Stage(usage, error)
        emit(StageEvent("analysis", "done", time.monotonic() - started, usage))
        return analysis, _Stage(usage)

    async def _synthesise(
        self,
        judge: Provider,
        judge_model: str,
        question: str,
        labelled: list[LabelledResponse],
        analysis: dict[str, Any] | None,
        fallback: str,
        emit: Emit,
    ) -> tuple[str, _Stage]:
        emit(StageEvent("synthesis", "running"))
        started = time.monotonic()
        prompt = self.prompts.render(
            "synthesis",
            question=question,
            responses=_for_template(labelled),
            analysis=analysis,
            analysis_json=_analysis_json(analysis, labelled),
        )
        request = CompletionRequest(
            model=judge_model,
            messages=(Message("user", prompt),),
            max_tokens=self.preset.limits.synthesis_max_tokens,
            headers=self._inner_headers,
        )
        parts: list[str] = []
        usage = Usage()
        error: AnalysisError | None = None
        try:
            async for chunk in judge.stream(request):
                if chunk.delta and (parts or chunk.delta.strip()):
                    delta = chunk.delta if parts else chunk.delta.lstrip()
                    parts.append(delta)
                    emit(AnswerDelta(delta))
                usage = chunk.usage or usage
        except ProviderError as exc:
            error = _upstream(exc)
        if error is None and not "".join(parts).strip():
            error = AnalysisError("judge_empty_completion", "the judge wrote an empty answer")
        if error is not None:
            emit(StageEvent("synthesis", "failed", time.monotonic() - started, usage, error.reason))
            if not parts:  # best effort: the first panel answer stands in for the fused one
                parts.append(fallback)
                emit(AnswerDelta(fallback))
            return "".join(parts), _Stage(usage, error)
        emit(StageEvent("synthesis", "done", time.monotonic() - started, usage))
        return "".join(parts).strip(), _Stage(usage)


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
    return reason, f"every panel member failed: {detail}"


def _total(usages: Sequence[Usage]) -> Usage:
    total = Usage()
    for usage in usages:
        total += usage
    return total


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
