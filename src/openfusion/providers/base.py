"""The provider protocol: one adapter per wire format, two calls (``complete``, ``stream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from openfusion.errors import InvalidResponseError
from openfusion.types import Chunk, Completion, CompletionRequest, Usage


@runtime_checkable
class Provider(Protocol):
    """Speaks one wire format. Knows nothing about fusion.

    ``supports_json_schema`` is the capability flag the engine reads: when true, a request's
    ``json_schema`` is enforced by the provider (constrained decoding or the upstream's
    structured outputs); when false the engine only asks for JSON in the prompt.
    """

    supports_json_schema: bool

    async def complete(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


async def collect(chunks: AsyncIterator[Chunk], model: str) -> Completion:
    """Join a stream into one completion (for providers whose ``complete`` is a stream)."""
    parts: list[str] = []
    usage: Usage | None = None
    finish_reason: str | None = None
    async for chunk in chunks:
        parts.append(chunk.delta)
        usage = chunk.usage or usage
        finish_reason = chunk.finish_reason or finish_reason
    if usage is None:
        raise InvalidResponseError(f"stream from {model!r} ended without usage")
    return Completion(content="".join(parts), usage=usage, model=model, finish_reason=finish_reason)
