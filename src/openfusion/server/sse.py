"""Server-sent events for streamed completions.

Text chunks are the hot path: their JSON is a fixed prefix and suffix around the escaped text,
built once per response, so a chunk costs one ``orjson.dumps`` of a string. Panel progress goes
out as SSE comment lines (``: openfusion-progress {...}``): every SSE client, the ``openai`` SDK
included, skips comments, and clients that want progress can read them. While nothing else is
said, ``: OPENFUSION PROCESSING`` keeps proxies from closing the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson

from openfusion.engine import MemberEvent, StageEvent, ToolEvent
from openfusion.server.errors import APIError
from openfusion.types import ToolCall

KEEPALIVE = b": OPENFUSION PROCESSING\n\n"
DONE = b"data: [DONE]\n\n"

T = TypeVar("T")


class ChunkEncoder:
    def __init__(self, generation_id: str, model: str, created: int) -> None:
        self._head = {
            "id": generation_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        head = orjson.dumps(self._head)[:-1]
        self._text_prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
        self._text_suffix = b'},"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        return self._event({"choices": [_choice({"role": "assistant", "content": ""}, None)]})

    def text(self, delta: str) -> bytes:
        return self._text_prefix + orjson.dumps(delta) + self._text_suffix

    def final(
        self,
        finish_reason: str,
        usage: dict[str, Any],
        extra: dict[str, Any],
        delta: dict[str, Any] | None = None,
    ) -> bytes:
        """The last chunk; ``delta`` carries what only the end knows (annotations)."""
        choice = _choice(delta or {}, finish_reason)
        return self._event({"choices": [choice], "usage": usage, **extra})

    def tool_calls(self, calls: Sequence[ToolCall]) -> bytes:
        """A chunk with the tool calls of a plain call (sent whole, before the last chunk)."""
        deltas = [
            {
                "index": i,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for i, c in enumerate(calls)
        ]
        return self._event({"choices": [_choice({"tool_calls": deltas}, None)]})

    def error(self, error: APIError) -> bytes:
        return self._event({**error.body(), "choices": [_choice({}, "error")]})

    def _event(self, fields: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**self._head, **fields}) + b"\n\n"


def progress(event: MemberEvent | StageEvent | ToolEvent, cost_so_far: float | None) -> bytes:
    """A progress comment; ``cost_so_far`` is the run's running total (None: not known)."""
    if isinstance(event, ToolEvent):
        tool = {"type": "tool", "index": event.index, "model": event.name, "tool": event.tool}
        tool.update(arguments=event.arguments, ok=event.ok, cost_so_far=cost_so_far)
        return b": openfusion-progress " + orjson.dumps(tool) + b"\n\n"
    if isinstance(event, MemberEvent):
        data: dict[str, Any] = {"type": "panel", "index": event.index, "model": event.name}
    elif event.stage == "caller":
        data = {"type": "caller", "stage": event.stage, "model": event.model}
    else:
        data = {"type": "judge", "stage": event.stage}
    data.update(state=event.state, seconds=round(event.elapsed, 3), reason=event.reason)
    if event.usage is not None:
        data.update(tokens=event.usage.completion_tokens, cost=event.usage.cost)
    data["cost_so_far"] = cost_so_far
    return b": openfusion-progress " + orjson.dumps(data) + b"\n\n"


def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason}


BUFFER = 64
"""Items read ahead of the client: those that arrived together go out in one write."""


async def with_keepalive(
    items: AsyncIterator[T], interval: float
) -> AsyncGenerator[list[T] | None, None]:
    """Yield the items, in lists of all that are ready at once, and ``None`` whenever
    ``interval`` seconds pass without one.

    One task reads the source into a queue of ``BUFFER`` (a tick must not cancel a pending
    ``anext``: that would disturb the source); the consumer waits on the queue under a timeout,
    then takes everything queued. Chunks an upstream sent in one packet, or that piled up while
    the loop was busy, so go out in one write, not one each (a write per chunk was a fifth of a
    streamed request's CPU under load); a lone chunk is not held back. Closing this iterator
    cancels the reader and closes the source (which cancels its work).
    """
    queue: asyncio.Queue[_Entry[T]] = asyncio.Queue(BUFFER)

    async def read() -> None:
        try:
            async for item in items:
                await queue.put(_Item(item))
        except Exception as exc:
            await queue.put(_Failed(exc))
        else:
            await queue.put(_END)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            try:
                if queue.empty():  # a timer only when there is a wait
                    async with asyncio.timeout(interval):
                        entry = await queue.get()
                else:
                    entry = queue.get_nowait()
            except TimeoutError:
                if reader.done() and queue.empty():  # it ended without a word (cancelled)
                    reader.result()
                    return
                yield None
                continue
            ready: list[T] = []
            while isinstance(entry, _Item):
                ready.append(entry.item)
                if queue.empty():
                    break
                entry = queue.get_nowait()
            if ready:
                yield ready
            if isinstance(entry, _Failed):
                raise entry.error
            if entry is _END:
                return
    finally:
        reader.cancel()
        with suppress(asyncio.CancelledError):
            await reader
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass(frozen=True, slots=True)
class _Item(Generic[T]):
    item: T


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


class _End:
    pass


_END = _End()
_Entry = _Item[T] | _Failed | _End
