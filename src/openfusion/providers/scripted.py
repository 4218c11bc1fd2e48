"""Deterministic provider: answers, latency and failures come from a script.

For tests and demos. A script maps a model name to one ``Step``, a list of steps (played in
order, the last one repeating) or a function of the request. ``scripted/<name>`` ids resolve to
it. From a config file::

    [providers.demo]
    type = "scripted"
    options.script = "/path/script.json"   # {"model-a": {"content": "...", "delay": 0.5}, ...}

In a script file a model maps to a step, a list of steps, or ``{"json": step, "text": step}``:
the first for requests that ask for JSON (a judge's analysis), the second for the others, so
one scripted judge serves any number of fusions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openfusion.errors import ConfigError, UpstreamError
from openfusion.providers.base import HONOURS_ALL, collect
from openfusion.settings import ProviderConfig, Settings
from openfusion.types import Chunk, Completion, CompletionRequest, ToolCall, Usage


@dataclass(frozen=True, slots=True)
class Step:
    content: str = ""
    delay: float = 0.0
    """Seconds before the first token."""
    chunk_delay: float = 0.0
    """Seconds between streamed words."""
    status: int | None = None
    """When set, the call fails with this HTTP status and ``error`` as the upstream's message."""
    error: str = "scripted failure"
    cost: float | None = 0.0
    reasoning_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls the model makes, e.g. ``ToolCall("c1", "fusion", "{}")`` (on the last chunk)."""
    reported: bool = True
    """False: the answer comes without usage, as from an upstream that reports none."""


StepSource = Step | Sequence[Step] | Callable[[CompletionRequest], Step]


@dataclass
class ScriptedProvider:
    script: Mapping[str, StepSource]
    supports_json_schema: bool = True
    honours: frozenset[str] = HONOURS_ALL
    calls: list[CompletionRequest] = field(default_factory=list)
    """Every request received, in order (tests read the prompts the engine sent)."""
    likelihood: Mapping[str, float] = field(default_factory=dict)
    """What ``loglikelihood`` says of a text (``UNSCORED`` for the others)."""
    scored: list[tuple[str, ...]] = field(default_factory=list)
    """The texts of every ``loglikelihood`` call, in order."""
    _played: dict[str, int] = field(default_factory=dict)

    def _next_step(self, request: CompletionRequest) -> Step:
        self.calls.append(request)
        source = self.script.get(request.model)
        if source is None:
            raise UpstreamError(
                f"scripted model {request.model!r} is not in the script", status=404
            )
        if isinstance(source, Step):
            return source
        if callable(source):
            return source(request)
        index = self._played.get(request.model, 0)
        self._played[request.model] = index + 1
        return source[min(index, len(source) - 1)]

    async def complete(self, request: CompletionRequest) -> Completion:
        return await collect(self._play(request), request.model)

    def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        return self._play(request)

    async def _play(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        step = self._next_step(request)
        await asyncio.sleep(step.delay)
        if step.status is not None:
            raise UpstreamError(step.error, status=step.status)
        words = step.content.split(" ") if step.content else []
        for i, word in enumerate(words):
            if i and step.chunk_delay:
                await asyncio.sleep(step.chunk_delay)
            yield Chunk(delta=word if i == 0 else " " + word)
        prompt = sum(len(m.content.split()) for m in request.messages)
        usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=len(step.content.split()),
            reasoning_tokens=step.reasoning_tokens,
            cost=step.cost,
        )
        if not step.reported:
            usage = Usage(cost=None, reported=False)
        finish = "tool_calls" if step.tool_calls else "stop"
        yield Chunk(usage=usage, finish_reason=finish, tool_calls=step.tool_calls)

    async def loglikelihood(
        self, request: CompletionRequest, continuations: Sequence[str]
    ) -> list[float]:
        """The scripted mean log-probability of each text (a judge's select mode asks)."""
        self.scored.append(tuple(continuations))
        return [self.likelihood.get(text, UNSCORED) for text in continuations]

    async def aclose(self) -> None:
        return None


UNSCORED = -1.0


def _step(item: dict[str, Any]) -> Step:
    calls = tuple(ToolCall(**call) for call in item.pop("tool_calls", []))
    return Step(**item, tool_calls=calls)


def _steps(value: Any) -> StepSource:
    if isinstance(value, list):
        return [_step(item) for item in value]
    if set(value) == {"json", "text"}:
        json_step, text_step = _step(value["json"]), _step(value["text"])
        return lambda request: json_step if request.json_schema is not None else text_step
    return _step(value)


def create(name: str, config: ProviderConfig, settings: Settings) -> ScriptedProvider:
    path = config.options.get("script")
    if path is None:
        return ScriptedProvider(script={})
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return ScriptedProvider(script={model: _steps(v) for model, v in raw.items()})
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"provider {name!r}: cannot load script {path}: {exc}") from exc
