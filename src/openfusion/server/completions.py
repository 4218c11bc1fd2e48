"""Choose what a request asks for, and run it: the planning both APIs share.

``POST /v1/chat/completions`` and ``POST /v1/responses`` (which first turns its body into a
chat completions body) are answered by the same run, an async iterator of ``Output``s, so that
JSON and SSE responses of either API are renderings of one run:

- fusion model (``openfusion/<preset>``, aliases ``openrouter/fusion`` for the default preset
  and ``openrouter/fusion-flash`` for ``fast``): panel → analysis → answer;
- caller tier (``plugins: [{"id": "fusion"}]`` or ``tools: [{"type": "openrouter:fusion"}]``):
  the engine's caller tier with the request's model (``models`` are its fallbacks);
- at the maximum fusion depth, a fusion request is one plain call to its judge (loop guard);
- anything else: a plain call, with ``models`` as fallbacks.

Everything that can be checked is checked in ``plan`` (unknown model, preset, missing key, a
field the model cannot honour, a model this server does not serve, a fusion asked for past the
maximum depth), so a bad request is a 400 even when it asked for a stream.

A server serves only the models its deployment configures: the members and judges of the
default preset and of the user's presets, and those ``[server] models`` lists. A fusion request
arriving deeper than ``max_depth`` came from a depth-limited call that reached this gateway
again (a preset's judge pointing back at it): it is refused, so such a loop ends after one
round.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openfusion.engine import (
    DEPTH_HEADER,
    AnswerDelta,
    Done,
    Fusion,
    FusionCallEvent,
    FusionEvent,
    FusionResult,
    MemberEvent,
    StageEvent,
    ToolEvent,
)
from openfusion.engine.budget import Budget
from openfusion.engine.fusion import configured_tools
from openfusion.engine.options import RunOptions
from openfusion.engine.policy import Caller, CircuitBreaker
from openfusion.engine.runlog import RunLog
from openfusion.engine.trace import CallObserver, ModelCallEvent, RunKind, Stage
from openfusion.errors import ConfigError, MissingAPIKeyError, ProviderError
from openfusion.presets import Preset, PresetCache, load_preset, user_preset_names
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.providers.base import refused_fields
from openfusion.server.errors import APIError, from_provider, upstream_status
from openfusion.server.schema import ChatCompletionRequest, FusionParams
from openfusion.settings import Settings
from openfusion.tools import ToolRegistry
from openfusion.types import CompletionRequest, Message, ToolCall, ToolSpec, Usage

FUSION_ALIAS = "openrouter/fusion"
FLASH_ALIAS = "openrouter/fusion-flash"
FUSION_PREFIX = "openfusion/"
ALIASES: dict[str, str | None] = {FUSION_ALIAS: None, FLASH_ALIAS: "fast"}
"""Fusion model ids that name no preset themselves: → the preset (``None``: the default)."""
PANEL_FAILURE_STATUS = {"rate_limited": 429, "insufficient_credits": 402}


@dataclass(frozen=True, slots=True)
class Text:
    delta: str


@dataclass(frozen=True, slots=True)
class Progress:
    event: MemberEvent | StageEvent | ToolEvent | FusionCallEvent


@dataclass(frozen=True, slots=True)
class Final:
    """The end of a run; the answer itself is the run's ``Text`` deltas joined."""

    usage: Usage
    cost_details: dict[str, float | None]
    fusion: dict[str, Any] | None
    finish_reason: str = "stop"
    tool_calls: tuple[ToolCall, ...] = ()
    annotations: tuple[dict[str, Any], ...] = ()


Output = Text | Progress | Final


def is_fusion_model(model: str) -> bool:
    return model in ALIASES or model.startswith(FUSION_PREFIX)


def fusion_object(result: FusionResult) -> dict[str, Any]:
    """The ``fusion`` object of a response: the result without what the response itself
    carries (the answer, its usage, its tool calls and finish reason)."""
    data = result.to_dict()
    for key in ("content", "usage", "tool_calls", "finish_reason"):
        data.pop(key)
    return data


class Completions:
    def __init__(
        self,
        settings: Settings,
        registry: ProviderRegistry,
        tools: ToolRegistry | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.caller = Caller.from_settings(registry, settings, breaker=breaker)
        """One for the process: retries and fallbacks per call, breaker state across calls."""
        self._tools = tools
        self._prompts: dict[tuple[tuple[str, Path], ...], PromptSet] = {}
        self._served: tuple[str, ...] | None = None
        self._presets = PresetCache(settings)
        self._fusions: dict[tuple[str, int], tuple[Preset, Fusion]] = {}
        """The last ``Fusion`` built per (preset name, depth), reused while its preset is the
        very one the cache gives (a request that changes the preset gets a fusion of its own)."""

    def _prompts_for(self, preset: Preset) -> PromptSet:
        """One prompt set per distinct override set, so Jinja compiles each template once
        per process instead of once per request."""
        key = tuple(sorted(preset.prompts.items()))
        if key not in self._prompts:
            self._prompts[key] = PromptSet(self.settings.prompt_dirs, preset.prompts)
        return self._prompts[key]

    def _fusion_for(self, preset: Preset, depth: int) -> Fusion:
        kept = self._fusions.get((preset.name, depth))
        if kept is not None and kept[0] is preset:
            _check(kept[1])  # cheap, and a setting gone wrong is still a 4xx/503 up front
            return kept[1]
        if self._tools is None and preset.tools.enabled:
            try:
                self._tools = configured_tools(self.settings)  # once, for every request
            except ConfigError as exc:
                raise APIError(503, f"this server's [tools] setting fails: {exc}") from exc
        fusion = Fusion(
            preset,
            settings=self.settings,
            caller=self.caller,
            tools=self._tools,
            prompts=self._prompts_for(preset),
            depth=depth,
            recorder=None,  # the server records each request's run itself
        )
        _check(fusion)
        self._fusions[(preset.name, depth)] = (preset, fusion)
        return fusion

    def plan(
        self, body: ChatCompletionRequest, depth: int, run: RunLog | None = None
    ) -> AsyncIterator[Output]:
        """The request's outputs; ``run`` (when given) gets its kind and every call it makes."""
        messages = tuple(m.to_message() for m in body.messages)
        params = body.fusion_params
        max_depth = self.settings.server.max_depth
        at_limit = depth >= max_depth
        candidates = [body.model, *(body.models or [])]
        if depth > max_depth and (is_fusion_model(body.model) or params is not None):
            raise APIError(
                400,
                f"fusion depth {depth} is past the maximum ({max_depth}): this request comes "
                "from a depth-limited call that reached this gateway again (does a preset's "
                "judge or member point back at it?); point that model at a plain upstream",
                {"depth": depth, "max_depth": max_depth},
            )
        if is_fusion_model(body.model):
            _refuse_on_a_fusion_model(body)
            preset = self._preset(body.model, params)
            self._check_served(preset.judges, "model")
            if at_limit:
                limit = self._limit_note(depth)
                return self._plain(preset.judges, messages, body, depth, limit, run)
            self._check_served(_panel_models(preset), "model")
            fusion = self._fusion_for(preset, depth)
            _kind(run, "fusion")
            events = fusion.stream(
                messages,
                max_cost=body.max_cost,
                options=_options(body),
                trace=run,
                **_tool_options(params),
            )
            return self._outputs(events)
        self._check_served(candidates[:1], "model")
        self._check_served(candidates[1:], "models")
        if params is None or at_limit:
            note = self._limit_note(depth) if params is not None else None
            return self._plain(candidates, messages, body, depth, note, run)
        preset = self._preset(FUSION_ALIAS, params)
        self._check_served((*_panel_models(preset), *preset.judges), "plugins")
        fusion = self._fusion_for(preset, depth)
        self._check_candidates(candidates, _request(body, messages, depth))
        functions = tuple(
            ToolSpec(f.name, f.description, f.parameters) for f in body.function_tools
        )
        _kind(run, "caller")
        events = fusion.call_stream(
            candidates,
            messages,
            functions=functions,
            tool_choice=_caller_choice(body),
            max_cost=body.max_cost,
            options=_options(body),
            trace=run,
            **_tool_options(params),
        )
        return self._outputs(events)

    # -- planning -------------------------------------------------------------------------

    def _preset(self, model: str, params: FusionParams | None) -> Preset:
        name = ALIASES[model] if model in ALIASES else model.removeprefix(FUSION_PREFIX)
        name = name or (params.preset if params else None) or self.settings.preset_name
        try:
            preset = self._presets.load(name)
            if params and params.analysis_models:
                preset = dataclasses.replace(
                    Preset.from_models(params.analysis_models, params.model or preset.judge),
                    limits=preset.limits,
                    prompts=preset.prompts,
                    tools=preset.tools,
                    policy=preset.policy,
                    reasoning=preset.reasoning,
                )
            elif params and params.model:
                preset = dataclasses.replace(preset, judge=params.model)
        except ConfigError as exc:
            raise _config_error(exc, model) from exc
        if params and params.reasoning:
            preset = dataclasses.replace(preset, reasoning=params.reasoning.value())
        if params and params.max_completion_tokens:
            limits = preset.limits.model_copy(
                update={"max_completion_tokens": params.max_completion_tokens}
            )
            preset = dataclasses.replace(preset, limits=limits)
        return preset

    def _check_candidates(self, candidates: Sequence[str], request: CompletionRequest) -> None:
        """Every candidate model resolves and can honour every field the request sets."""
        for index, model_id in enumerate(candidates):
            where = "model" if index == 0 else "models"
            try:
                provider, _ = self.registry.resolve(model_id)
            except ConfigError as exc:
                raise _config_error(exc, model_id, where) from exc
            refused = refused_fields(provider, request)
            if refused:
                raise APIError(
                    400,
                    f"{refused[0]}: {model_id} cannot honour it (it does not support "
                    f"{', '.join(refused)}); leave it out or pick another model",
                    {"model": model_id, "fields": refused},
                )

    def served(self) -> tuple[str, ...]:
        """The model ids (``*`` wildcards) this server calls: the members and judges of the
        default preset and of the user's presets, and ``[server] models``."""
        if self._served is None:
            names = {self.settings.preset_name, *user_preset_names(self.settings)}
            try:
                presets = [load_preset(name, self.settings) for name in sorted(names)]
            except ConfigError as exc:
                raise APIError(503, f"this server's presets fail to load: {exc}") from exc
            members = {m for p in presets for m in (*_panel_models(p), *p.judges)}
            self._served = (*sorted(members), *(self.settings.server.models or ()))
        return self._served

    def serves(self, model_id: str) -> bool:
        return any(fnmatch.fnmatchcase(model_id, pattern) for pattern in self.served())

    def serves_preset(self, preset: Preset) -> bool:
        return all(self.serves(m) for m in (*_panel_models(preset), *preset.judges))

    def _check_served(self, models: Iterable[str], field: str) -> None:
        """A 400 naming the first of ``models`` this server does not serve."""
        for model_id in models:
            if not self.serves(model_id):
                try:  # a typo is better named as one
                    self.registry.check(model_id)
                except ConfigError as exc:
                    raise _config_error(exc, model_id, field) from exc
                raise APIError(
                    400,
                    f"{field}: {model_id} is not served by this server; it serves the models "
                    "of its presets and those its operator lists in [server] models",
                    {"model": model_id},
                )

    def _limit_note(self, depth: int) -> dict[str, Any]:
        return {
            "status": "ok",
            "note": "depth_limit",
            "message": (
                f"fusion depth {depth} reached the maximum ({self.settings.server.max_depth}): "
                "answered by a single call instead of a panel"
            ),
            "depth": depth,
            "analysis": None,
            "responses": [],
            "failed_models": [],
            "failure_reason": None,
        }

    # -- runs -----------------------------------------------------------------------------

    async def _outputs(self, events: AsyncIterator[FusionEvent]) -> AsyncIterator[Output]:
        """A fusion or caller-tier run of the engine, as outputs."""
        async for event in events:
            if isinstance(event, AnswerDelta):
                yield Text(event.text)
            elif isinstance(event, Done):
                result = event.result
                _raise_if_failed(result)
                yield Final(
                    result.usage,
                    result.cost_details,
                    fusion_object(result) if result.fused else None,
                    result.finish_reason,
                    result.tool_calls,
                    annotations=result.annotations,
                )
            else:
                yield Progress(event)

    def _plain(
        self,
        candidates: Sequence[str],
        messages: tuple[Message, ...],
        body: ChatCompletionRequest,
        depth: int,
        fusion_note: dict[str, Any] | None,
        run: RunLog | None,
    ) -> AsyncIterator[Output]:
        _kind(run, "call")
        observe = _observer(run, "call")
        tools = tuple(ToolSpec(f.name, f.description, f.parameters) for f in body.function_tools)
        offered: dict[str, Any] = {"tools": tools, "tool_choice": body.tool_choice}
        if not tools:  # a choice among no tools is no choice
            offered = {"parallel_tool_calls": None}
        request = _request(body, messages, depth, **offered)
        self._check_candidates(candidates, request)
        budget = Budget(body.max_cost) if body.max_cost is not None else None

        async def call_plainly() -> AsyncIterator[Output]:
            try:
                if body.stream:
                    usage, finish = Usage(cost=None, reported=False), "stop"
                    calls: list[ToolCall] = []
                    stream = self.caller.stream(candidates, request, budget, observe=observe)
                    async for chunk in stream:
                        if chunk.delta:
                            yield Text(chunk.delta)
                        usage = chunk.usage or usage
                        finish = chunk.finish_reason or finish
                        calls.extend(chunk.tool_calls)
                    finish = "tool_calls" if calls else finish
                    yield Final(usage, {"call": usage.cost}, fusion_note, finish, tuple(calls))
                    return
                call = await self.caller.complete(candidates, request, budget, observe=observe)
            except ProviderError as exc:
                raise from_provider(exc, candidates[0]) from exc
            done = call.completion
            yield Text(done.content)
            yield Final(
                done.usage,
                {"call": done.usage.cost},
                fusion_note,
                "tool_calls" if done.tool_calls else done.finish_reason or "stop",
                done.tool_calls,
            )

        return call_plainly()


def _panel_models(preset: Preset) -> tuple[str, ...]:
    return tuple(m for slot in preset.panel for m in slot.models)


def _kind(run: RunLog | None, kind: RunKind) -> None:
    if run is not None:
        run.kind = kind


def _observer(run: RunLog | None, stage: Stage) -> CallObserver | None:
    if run is None:
        return None
    return lambda record: run.event(ModelCallEvent(stage, None, record))


def _options(body: ChatCompletionRequest) -> RunOptions:
    """The request's fields, for the engine (``RunOptions`` says where each goes)."""
    return RunOptions(
        temperature=body.temperature,
        top_p=body.top_p,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
        reasoning=body.reasoning_value,
        user=body.user,
        max_tokens=body.max_tokens or body.max_completion_tokens,
        stop=body.stop_sequences,
        response_format=body.response_format,
    )


def _request(
    body: ChatCompletionRequest, messages: tuple[Message, ...], depth: int, **fields: Any
) -> CompletionRequest:
    """A call for the request's own model: every field it sets, one level deeper."""
    options = _options(body)
    fields.setdefault("parallel_tool_calls", body.parallel_tool_calls)
    return options.request(
        model="",
        messages=messages,
        seed=body.seed,
        headers={DEPTH_HEADER: str(depth + 1)},
        reasoning=options.reasoning,
        user=options.user,
        **fields,
    )


def _refuse_on_a_fusion_model(body: ChatCompletionRequest) -> None:
    """Fields a fusion model cannot honour: 400 naming the first one set. Function tools are
    fine: offered tools, a model may answer without calling them, and a fusion always does
    (a panel member calling a fusion model offers its tools, as to any model)."""
    if body.tool_choice not in (None, "auto", "none"):
        raise APIError(
            400,
            "tool_choice: a fusion model never calls your functions; to let a model choose "
            "between them and the fusion, send them to it with the fusion plugin (caller tier)",
        )
    if body.models:
        raise APIError(
            400, "models: fallbacks are for a single model; a preset's slots list their own"
        )


def _caller_choice(body: ChatCompletionRequest) -> str | None:
    """The caller tier's ``tool_choice``: a mode, ``fusion``, or a function by name."""
    if body.named_tool is not None:
        return body.named_tool
    return body.tool_choice if isinstance(body.tool_choice, str) else None


def _tool_options(params: FusionParams | None) -> dict[str, Any]:
    """The fusion parameters' ``tools`` (names allowed; ``[]``: none) and ``max_tool_calls``.

    A tool is named by a string, ``{"type": name}``, ``{"name": name}`` or an OpenAI function
    entry ``{"type": "function", "function": {"name": name}}``.
    """
    options: dict[str, Any] = {}
    if params is None:
        return options
    if params.tools is not None:
        names = []
        for entry in params.tools:
            function = entry.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            names.append(name or entry.get("name") or entry.get("type"))
        options["tools"] = [n for n in names if isinstance(n, str)]
    if params.max_tool_calls is not None:
        options["max_tool_calls"] = params.max_tool_calls
    return options


def _check(fusion: Fusion) -> None:
    try:
        fusion.check()
    except ConfigError as exc:
        raise _config_error(exc, fusion.preset.name) from exc


def _config_error(exc: ConfigError, model: str, field: str = "model") -> APIError:
    """A missing upstream key is the operator's to fix (503); anything else is the request's."""
    if isinstance(exc, MissingAPIKeyError):
        return APIError(503, f"this server is not configured for it: {exc}", {"model": model})
    return APIError(400, f"{field}: {exc}", {"model": model})


def _raise_if_failed(result: FusionResult) -> None:
    """A run that has no answer to give is an error status (or error event, in a stream)."""
    reason = result.failure_reason
    if reason == "unexpected_error":  # the details are in the server log, not for clients
        raise APIError(
            500,
            "internal error: the run crashed; see the server log",
            {
                "failure_reason": reason,
            },
        )
    if result.caller_failure is not None:
        failure = result.caller_failure
        raise APIError(
            upstream_status(failure.reason, failure.status),
            failure.message,
            {"model": failure.model, "reason": failure.reason, "upstream_status": failure.status},
        )
    if result.caller is None and result.status == "error":
        reason = reason or "all_panels_failed"
        raise APIError(
            PANEL_FAILURE_STATUS.get(reason, 502),
            result.failure_message or "every panel member failed",
            {
                "failure_reason": reason,
                "failed_models": [f.to_dict() for f in result.failed_models],
            },
        )
