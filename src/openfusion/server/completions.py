"""``POST /v1/chat/completions``: choose what the request asks for, and run it.

Four ways a request is answered, each an async iterator of ``Output``s so that JSON and SSE
responses are two renderings of one run:

- fusion model (``openfusion/<preset>``, alias ``openrouter/fusion``): panel → analysis → answer;
- caller tier (``plugins: [{"id": "fusion"}]`` or ``tools: [{"type": "openrouter:fusion"}]``):
  the request's model is offered a ``fusion`` tool, gets the analysis and panel answers as the
  tool result, and writes the answer;
- at the maximum fusion depth, a fusion request is one plain call to its judge (loop guard);
- anything else: a plain call, with ``models`` as fallbacks.

Everything that can be checked is checked in ``plan`` (unknown model, preset, missing key), so a
bad request is a 400 even when it asked for a stream.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openfusion.engine import (
    DEPTH_HEADER,
    AnswerDelta,
    Done,
    Fusion,
    FusionResult,
    MemberEvent,
    StageEvent,
    ToolEvent,
)
from openfusion.engine.budget import Budget
from openfusion.engine.fusion import configured_tools
from openfusion.engine.policy import Caller
from openfusion.engine.runlog import RunLog
from openfusion.engine.trace import CallObserver, ModelCallEvent, RunKind, Stage
from openfusion.errors import ConfigError, MissingAPIKeyError, ProviderError
from openfusion.presets import Preset, load_preset
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.server.errors import APIError, from_provider
from openfusion.server.schema import ChatCompletionRequest, FusionParams
from openfusion.settings import Settings
from openfusion.tools import ToolRegistry
from openfusion.types import CompletionRequest, Message, ToolCall, ToolSpec, Usage

FUSION_ALIAS = "openrouter/fusion"
FUSION_PREFIX = "openfusion/"
FUSION_TOOL = ToolSpec(
    name="fusion",
    description=(
        "Ask a panel of independent models the question and get back a judge's analysis of "
        "their answers (consensus, contradictions, partial coverage, unique insights, blind "
        "spots) and the answers themselves. Use it for questions that deserve deliberation."
    ),
    parameters={
        "type": "object",
        "properties": {"prompt": {"type": "string", "description": "The question to deliberate."}},
        "required": ["prompt"],
    },
)
PANEL_FAILURE_STATUS = {"rate_limited": 429, "insufficient_credits": 402}


@dataclass(frozen=True, slots=True)
class Text:
    delta: str


@dataclass(frozen=True, slots=True)
class Progress:
    event: MemberEvent | StageEvent | ToolEvent


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
    return model == FUSION_ALIAS or model.startswith(FUSION_PREFIX)


def fusion_object(result: FusionResult) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("content")
    data.pop("usage")
    return data


class Completions:
    def __init__(
        self, settings: Settings, registry: ProviderRegistry, tools: ToolRegistry | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.caller = Caller.from_settings(registry, settings)
        """One for the process: retries and fallbacks per call, breaker state across calls."""
        self._tools = tools
        self._prompts: dict[tuple[tuple[str, Path], ...], PromptSet] = {}

    def _prompts_for(self, preset: Preset) -> PromptSet:
        """One prompt set per distinct override set, so Jinja compiles each template once
        per process instead of once per request."""
        key = tuple(sorted(preset.prompts.items()))
        if key not in self._prompts:
            self._prompts[key] = PromptSet(self.settings.prompt_dirs, preset.prompts)
        return self._prompts[key]

    def _fusion_for(self, preset: Preset, depth: int) -> Fusion:
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
        return fusion

    def plan(
        self, body: ChatCompletionRequest, depth: int, run: RunLog | None = None
    ) -> AsyncIterator[Output]:
        """The request's outputs; ``run`` (when given) gets its kind and every call it makes."""
        messages = tuple(m.to_message() for m in body.messages)
        params = body.fusion_params
        at_limit = depth >= self.settings.server.max_depth
        if is_fusion_model(body.model):
            preset = self._preset(body.model, params)
            if at_limit:
                return self._plain(
                    preset.judges, messages, body, depth, self._limit_note(depth), run
                )
            _kind(run, "fusion")
            return self._fusion(self._fusion_for(preset, depth), messages, body, run)
        if params is not None:
            if at_limit:
                return self._plain(
                    [body.model], messages, body, depth, self._limit_note(depth), run
                )
            fusion = self._fusion_for(self._preset(FUSION_ALIAS, params), depth)
            self._resolve(body.model)
            _kind(run, "caller")
            return self._caller(fusion, messages, body, depth, run)
        for fallback in body.models or ():
            self._resolve(fallback, field="models")
        return self._plain([body.model, *(body.models or [])], messages, body, depth, None, run)

    # -- planning -------------------------------------------------------------------------

    def _preset(self, model: str, params: FusionParams | None) -> Preset:
        name = model.removeprefix(FUSION_PREFIX) if model != FUSION_ALIAS else None
        name = name or (params.preset if params else None) or self.settings.preset_name
        try:
            preset = load_preset(name, self.settings)
            if params and params.analysis_models:
                preset = dataclasses.replace(
                    Preset.from_models(params.analysis_models, params.model or preset.judge),
                    limits=preset.limits,
                    prompts=preset.prompts,
                    tools=preset.tools,
                    policy=preset.policy,
                )
            elif params and params.model:
                preset = dataclasses.replace(preset, judge=params.model)
        except ConfigError as exc:
            raise _config_error(exc, model) from exc
        return preset

    def _resolve(self, model_id: str, field: str = "model") -> None:
        try:
            self.registry.resolve(model_id)
        except ConfigError as exc:
            raise _config_error(exc, model_id, field) from exc

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

    async def _fusion(
        self,
        fusion: Fusion,
        messages: tuple[Message, ...],
        body: ChatCompletionRequest,
        run: RunLog | None,
    ) -> AsyncIterator[Output]:
        events = fusion.stream(
            messages,
            temperature=body.temperature,
            max_cost=body.max_cost,
            trace=run,
            **_tool_options(body.fusion_params),
        )
        async for event in events:
            if isinstance(event, MemberEvent | StageEvent | ToolEvent):
                yield Progress(event)
            elif isinstance(event, AnswerDelta):
                yield Text(event.text)
            elif isinstance(event, Done):
                result = event.result
                _raise_if_failed(result)
                yield Final(
                    result.usage,
                    result.cost_details,
                    fusion_object(result),
                    annotations=result.annotations,
                )

    def _plain(
        self,
        candidates: Sequence[str],
        messages: tuple[Message, ...],
        body: ChatCompletionRequest,
        depth: int,
        fusion_note: dict[str, Any] | None,
        run: RunLog | None,
    ) -> AsyncIterator[Output]:
        for model_id in candidates:
            self._resolve(model_id)
        _kind(run, "call")
        observe = _observer(run, "call")
        tools = tuple(ToolSpec(f.name, f.description, f.parameters) for f in body.function_tools)
        choice = body.tool_choice if isinstance(body.tool_choice, str) else None

        request = _request(body, messages, depth, tools=tools, tool_choice=choice)
        budget = Budget(body.max_cost) if body.max_cost is not None else None

        async def call_plainly() -> AsyncIterator[Output]:
            try:
                if body.stream and not tools:
                    usage, finish = Usage(cost=None), "stop"
                    async for chunk in self.caller.stream(
                        candidates, request, budget, observe=observe
                    ):
                        if chunk.delta:
                            yield Text(chunk.delta)
                        usage = chunk.usage or usage
                        finish = chunk.finish_reason or finish
                    yield Final(usage, {"call": usage.cost}, fusion_note, finish)
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

    async def _caller(
        self,
        fusion: Fusion,
        messages: tuple[Message, ...],
        body: ChatCompletionRequest,
        depth: int,
        run: RunLog | None,
    ) -> AsyncIterator[Output]:
        observe = _observer(run, "caller")
        forced = body.tool_choice == "required" or (
            isinstance(body.tool_choice, dict)
            and body.tool_choice.get("function", {}).get("name") == "fusion"
        )
        base = _request(body, messages, depth, tools=(FUSION_TOOL,))
        caller = [body.model]
        try:
            first_call = await self.caller.complete(
                caller,
                dataclasses.replace(base, tool_choice="required" if forced else "auto"),
                observe=observe,
            )
        except ProviderError as exc:
            raise from_provider(exc, body.model) from exc
        first = first_call.completion
        call = next((c for c in first.tool_calls if c.name == "fusion"), None)
        if call is None and not forced:  # the caller judged the prompt not worth a panel
            yield Text(first.content)
            yield Final(first.usage, {"caller": first.usage.cost}, None)
            return
        if call is None:  # forced, but the caller model cannot call tools: call it for it
            call = ToolCall("call_fusion", "fusion", json.dumps({"prompt": _last_user(messages)}))
        prompt = _tool_prompt(call) or _last_user(messages)
        result: FusionResult | None = None
        events = fusion.stream(
            prompt,
            temperature=body.temperature,
            synthesise=False,
            max_cost=body.max_cost,
            trace=run,
            **_tool_options(body.fusion_params),
        )
        async for event in events:
            if isinstance(event, MemberEvent | StageEvent | ToolEvent):
                yield Progress(event)
            elif isinstance(event, Done):
                result = event.result
        assert result is not None
        tool_result = json.dumps(_tool_result(result), ensure_ascii=False)
        final_request = dataclasses.replace(
            base,
            messages=(
                *messages,
                Message("assistant", first.content, tool_calls=(call,)),
                Message("tool", tool_result, tool_call_id=call.id),
            ),
            tool_choice="none",
        )
        usage = Usage(cost=None)
        try:
            async for chunk in self.caller.stream(caller, final_request, observe=observe):
                if chunk.delta:
                    yield Text(chunk.delta)
                usage = chunk.usage or usage
        except ProviderError as exc:
            raise from_provider(exc, body.model) from exc
        caller_usage = first.usage + usage
        yield Final(
            caller_usage + result.usage,
            {"caller": caller_usage.cost, **result.cost_details},
            fusion_object(result),
        )


def _kind(run: RunLog | None, kind: RunKind) -> None:
    if run is not None:
        run.kind = kind


def _observer(run: RunLog | None, stage: Stage) -> CallObserver | None:
    if run is None:
        return None
    return lambda record: run.event(ModelCallEvent(stage, None, record))


def _request(
    body: ChatCompletionRequest, messages: tuple[Message, ...], depth: int, **fields: Any
) -> CompletionRequest:
    """A call for the request's own model: its sampling fields, one level deeper."""
    return CompletionRequest(
        model="",
        messages=messages,
        temperature=body.temperature,
        max_tokens=body.max_tokens or body.max_completion_tokens,
        seed=body.seed,
        stop=body.stop_sequences,
        headers={DEPTH_HEADER: str(depth + 1)},
        **fields,
    )


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
    if result.status == "error":
        reason = result.failure_reason or "all_panels_failed"
        raise APIError(
            PANEL_FAILURE_STATUS.get(reason, 502),
            result.failure_message or "every panel member failed",
            {
                "failure_reason": reason,
                "failed_models": [f.to_dict() for f in result.failed_models],
            },
        )


def _tool_result(result: FusionResult) -> dict[str, Any]:
    if result.status == "error":
        return {"error": result.failure_message, "failure_reason": result.failure_reason}
    return {
        "analysis": result.analysis,
        "responses": [{"model": r.name, "content": r.content} for r in result.responses],
        "failed_models": [f.to_dict() for f in result.failed_models],
    }


def _tool_prompt(call: ToolCall) -> str | None:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        return None
    prompt = arguments.get("prompt") if isinstance(arguments, dict) else None
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def _last_user(messages: Sequence[Message]) -> str:
    return next(m.content for m in reversed(messages) if m.role == "user")
