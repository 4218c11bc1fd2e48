"""A scriptable OpenAI-compatible upstream on 127.0.0.1, over real HTTP.

    async with MockUpstream() as up:
        up.replies["slow-model"] = Reply(delay=5)      # per model
        up.queue.append(Reply(status=429, error={"message": "slow down"}))  # next request only
        up.replies["flaky"] = in_turn(Reply(status=503), Reply())  # per model, in turn
        up.replies["judge"] = lambda body: Reply(...)  # chosen by the request's JSON body
        ... point a provider at up.base_url ...
        up.requests[0].headers["Authorization"]
        up.disconnects                                 # clients that left during a delay
        up.served                                      # completions served (billed), with cost
        up.in_flight, up.open_connections              # requests running, TCP connections open

A request takes the first queued ``Reply``, else the one for its model (a ``Reply``, or a
function of the request body that returns one), else ``up.default``.
``stream: true`` requests get server-sent events: the content in small chunks, a finish chunk,
a usage chunk and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiohttp import web


@dataclass
class Reply:
    content: str = "Hello from the mock upstream."
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = field(
        default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    )
    """Sent as ``usage`` (``None``: no usage at all)."""
    cost: float | None = None
    """Added to usage as ``usage.cost`` (OpenRouter style) when set."""
    reasoning_tokens: int | None = None
    """Added as ``usage.completion_tokens_details.reasoning_tokens`` when set."""
    status: int = 200
    error: dict[str, Any] | None = None
    """When set, the body is ``{"error": error}`` (with ``status``, which may be 200)."""
    body: str | None = None
    """A raw body sent as it is, instead of a completion."""
    delay: float = 0.0
    """Seconds to wait before answering."""
    chunk_size: int = 4
    chunk_delay: float = 0.0
    comments: bool = False
    """Stream: send ``: OPENROUTER PROCESSING`` comment lines between events."""
    cut_after: int | None = None
    """Stream: end the response after this many content chunks (no finish, no [DONE])."""
    reset: bool = False
    """Drop the connection: before any response, or after ``cut_after`` chunks when streaming."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. ``{"Retry-After": "1"}``."""
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    """``(id, name, arguments)`` of calls the model makes; streamed, each call's arguments
    arrive in pieces of ``chunk_size`` characters, as OpenAI streams them."""


ReplySource = Reply | Callable[[Any], Reply]
"""A ``Reply``, or a function of the request's JSON body that picks one."""


def in_turn(*replies: Reply) -> Callable[[Any], Reply]:
    """The replies one per request, in order; the last one then answers every later request."""
    pending = deque(replies)

    def next_reply(_body: Any) -> Reply:
        return pending.popleft() if len(pending) > 1 else pending[0]

    return next_reply


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    json: Any
    at: float = field(default_factory=time.monotonic)
    """When it arrived (``time.monotonic()``)."""

    @property
    def model(self) -> str:
        return str(self.json.get("model", "")) if isinstance(self.json, dict) else ""


@dataclass(frozen=True)
class Served:
    """A completion the upstream served, so billed: a 200 completion body, or a stream that
    reached ``[DONE]`` (a cut stream is not one)."""

    model: str
    cost: float | None
    stream: bool


class MockUpstream:
    def __init__(
        self, default: Reply | None = None, *, record: bool = True, backlog: int = 128
    ) -> None:
        """``record=False`` keeps no ``requests`` or ``served`` (a benchmark sends too many);
        ``backlog`` is the listening socket's (thousands of clients connect at once in one)."""
        self.default = default or Reply()
        self.record = record
        self.backlog = backlog
        self.replies: dict[str, ReplySource] = {}
        self.queue: deque[Reply] = deque()
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        """Requests whose client went away while their ``Reply.delay`` ran (handler cancelled)."""
        self.served: list[Served] = []
        self.in_flight = 0
        """Requests whose handler is still running."""
        self.base_url = ""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)

    async def __aenter__(self) -> MockUpstream:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=self.backlog)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()

    @property
    def open_connections(self) -> int:
        """TCP connections from clients that are open on the server side (idle keep-alive ones
        included); one leaves this count once the server has finished with it."""
        server = self._runner.server
        return 0 if server is None else len(server.connections)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def reply_for(self, model: str, body: Any) -> Reply:
        source = self.replies.get(model, self.default)
        return source if isinstance(source, Reply) else source(body)

    def usage_dict(self, reply: Reply) -> dict[str, Any] | None:
        if reply.usage is None:
            return None
        usage = dict(reply.usage)
        if reply.cost is not None:
            usage["cost"] = reply.cost
        if reply.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
        return usage

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if self.record:
            self.requests.append(RecordedRequest(request.path, dict(request.headers), body))
        model = body.get("model", "") if isinstance(body, dict) else ""
        reply = self.queue.popleft() if self.queue else self.reply_for(model, body)
        if reply.delay:
            try:
                await asyncio.sleep(reply.delay)
            except asyncio.CancelledError:
                self.disconnects += 1
                raise
        if reply.reset and reply.cut_after is None:
            _drop(request)
        if reply.body is not None:
            return web.Response(status=reply.status, text=reply.body, headers=reply.headers)
        if reply.error is not None:
            return web.json_response(
                {"error": reply.error}, status=reply.status, headers=reply.headers
            )
        if isinstance(body, dict) and body.get("stream"):
            return await self._stream(request, reply, model)
        data: dict[str, Any] = {
            "id": "mock-1",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply.content,
                        **_tool_calls(reply),
                    },
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if (usage := self.usage_dict(reply)) is not None:
            data["usage"] = usage
        response = web.json_response(data, status=reply.status, headers=reply.headers)
        if reply.status == 200 and self.record:
            self.served.append(Served(model, reply.cost, stream=False))
        return response

    async def _stream(self, request: web.Request, reply: Reply, model: str) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=reply.status, headers={**reply.headers, "Content-Type": "text/event-stream"}
        )
        await resp.prepare(request)

        async def event(choice: dict[str, Any] | None, **extra: Any) -> None:
            if reply.comments:
                await resp.write(b": OPENROUTER PROCESSING\n\n")
            data = {"id": "mock-1", "object": "chat.completion.chunk", "model": model, **extra}
            data["choices"] = [] if choice is None else [{"index": 0, **choice}]
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

        await event({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        size = max(1, reply.chunk_size)
        pieces = [reply.content[i : i + size] for i in range(0, len(reply.content), size)]
        for n, piece in enumerate(pieces):
            if reply.cut_after is not None and n >= reply.cut_after:
                if reply.reset:
                    _drop(request)
                await resp.write_eof()
                return resp
            await event({"delta": {"content": piece}, "finish_reason": None})
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
        for index, (call_id, name, arguments) in enumerate(reply.tool_calls):
            head = {"index": index, "id": call_id, "type": "function", "function": {"name": name}}
            await event({"delta": {"tool_calls": [head]}, "finish_reason": None})
            for i in range(0, len(arguments), size):
                piece = {"index": index, "function": {"arguments": arguments[i : i + size]}}
                await event({"delta": {"tool_calls": [piece]}, "finish_reason": None})
        await event({"delta": {}, "finish_reason": reply.finish_reason})
        if (usage := self.usage_dict(reply)) is not None:
            await event(None, usage=usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        if reply.status == 200 and self.record:
            self.served.append(Served(model, reply.cost, stream=True))
        return resp


def _tool_calls(reply: Reply) -> dict[str, Any]:
    if not reply.tool_calls:
        return {}
    calls = [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
        for i, n, a in reply.tool_calls
    ]
    return {"tool_calls": calls}


def _drop(request: web.Request) -> NoReturn:
    """Close the TCP connection without (completing) a response."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError


def ignoring_max_tokens(
    answer: Callable[[Any], Reply], factor: int = 10, *, default: int = 4096
) -> Callable[[Any], Reply]:
    """An upstream that ignores ``max_tokens``: ``answer``'s reply, billed (``usage``) for
    ``factor`` times the tokens the request asked for (``default`` when it set none), and its
    prompt at a quarter token per byte of the messages (what real tokenizers come close to)."""

    def reply(body: Any) -> Reply:
        picked = answer(body)
        asked = body.get("max_tokens") or default if isinstance(body, dict) else default
        messages = body.get("messages", []) if isinstance(body, dict) else []
        prompt = -(-len(json.dumps(messages).encode()) // 4)
        completion = factor * int(asked)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return Reply(
            content=picked.content,
            usage=usage,
            tool_calls=picked.tool_calls,
            finish_reason=picked.finish_reason,
        )

    return reply
