"""The provider protocol: one adapter per wire format, two calls (``complete``, ``stream``)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

from openfusion.errors import InvalidResponseError
from openfusion.types import (
    OPTIONAL_FIELDS,
    Chunk,
    Completion,
    CompletionRequest,
    ToolCall,
    Usage,
    fields_set,
)


@runtime_checkable
class Provider(Protocol):
    """Speaks one wire format. Knows nothing about fusion.

    Capabilities the engine reads:

    - ``supports_json_schema``: when true, a request's ``json_schema`` is enforced by the
      provider (constrained decoding or the upstream's structured outputs); when false the
      engine only asks for JSON in the prompt.
    - ``honours``: the optional request fields (``types.OPTIONAL_FIELDS``) the provider acts
      on. A client's pass-through request setting another one is refused (400 naming it);
      fusion calls leave it out for this provider (e.g. ``reasoning`` for a model without).
    """

    supports_json_schema: bool
    honours: frozenset[str]

    async def complete(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Scorer(Protocol):
    """A provider that can say how likely a model finds a text (llama.cpp in process can; most
    HTTP APIs cannot score given text). The judge's select mode uses it (``engine/select.py``)."""

    async def loglikelihood(
        self, request: CompletionRequest, continuations: Sequence[str]
    ) -> list[float]:
        """Mean log-probability per token of each continuation as the answer to ``request``
        (its end included: a continuation that should go on scores lower)."""
        ...


async def collect(chunks: AsyncIterator[Chunk], model: str) -> Completion:
    """Join a stream into one completion (for providers whose ``complete`` is a stream)."""
    parts: list[str] = []
    usage: Usage | None = None
    finish_reason: str | None = None
    calls: list[ToolCall] = []
    async for chunk in chunks:
        parts.append(chunk.delta)
        usage = chunk.usage or usage
        finish_reason = chunk.finish_reason or finish_reason
        calls.extend(chunk.tool_calls)
    if usage is None:
        raise InvalidResponseError(f"stream from {model!r} ended without usage")
    return Completion(
        content="".join(parts),
        usage=usage,
        model=model,
        finish_reason=finish_reason,
        tool_calls=tuple(calls),
    )


def refused_fields(provider: Provider, request: CompletionRequest) -> list[str]:
    """The optional fields ``request`` sets that ``provider`` cannot honour."""
    return [f for f in fields_set(request) if f not in provider.honours]


def honoured_part(provider: Provider, request: CompletionRequest) -> CompletionRequest:
    """``request`` without the optional fields ``provider`` cannot honour."""
    refused = refused_fields(provider, request)
    if not refused:
        return request
    cleared: dict[str, Any] = {f: () if f == "stop" else None for f in refused}
    return dataclasses.replace(request, **cleared)


HONOURS_ALL = OPTIONAL_FIELDS


class ToolCallJoiner:
    """Joins the pieces of streamed tool calls (OpenAI's ``delta.tool_calls``) by index."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, pieces: Any) -> None:
        for piece in pieces if isinstance(pieces, list) else []:
            if not isinstance(piece, dict):
                continue
            index = piece.get("index")
            call = self._calls.setdefault(index if isinstance(index, int) else 0, {})
            if isinstance(piece.get("id"), str):
                call["id"] = piece["id"]
            function = piece.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    call["name"] = call.get("name", "") + function["name"]
                if isinstance(function.get("arguments"), str):
                    call["arguments"] = call.get("arguments", "") + function["arguments"]

    def calls(self) -> tuple[ToolCall, ...]:
        """The whole calls so far; a call without a name is dropped, not guessed at."""
        return tuple(
            ToolCall(c.get("id") or f"call_{i}", c["name"], c.get("arguments") or "{}")
            for i, c in sorted(self._calls.items())
            if c.get("name")
        )
