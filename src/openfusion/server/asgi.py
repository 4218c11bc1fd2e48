"""The app's ASGI layer: routing, lifespan, errors and streamed bodies, in plain ASGI.

Starlette's application wraps every request in two middleware layers (server errors,
exception handlers) and its router in a third, each wrapping ``send`` again; a streamed
response starts an anyio task group. Profiles of the gateway showed those layers as a fifth of
its CPU per request, for routing seven fixed paths. Here a request costs one dict lookup (a
regex only for paths with a parameter), one ``Request``, and the endpoint. Starlette's
``Request`` and ``Response`` classes are still what endpoints take and return.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openfusion.server.errors import APIError

log = logging.getLogger("openfusion.server")

Endpoint = Callable[[Request], Awaitable[Response]]
PARAMETER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    """A fixed path, or one with ``{name}`` segments (``request.path_params[name]``)."""
    endpoint: Endpoint
    methods: Sequence[str] = ("GET",)


class Routes:
    """The app: ``routes`` answered, everything else a JSON error in OpenRouter's shape (404,
    405); a trailing slash is redirected away, as Starlette did. ``lifespan`` is entered at
    startup and left at shutdown."""

    def __init__(
        self,
        routes: Sequence[Route],
        lifespan: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self._fixed: dict[str, dict[str, Endpoint]] = {}
        self._patterns: list[tuple[re.Pattern[str], str, dict[str, Endpoint]]] = []
        for route in routes:
            methods = dict.fromkeys(route.methods, route.endpoint)
            if PARAMETER.search(route.path):
                regex = PARAMETER.sub(r"(?P<\1>[^/]+)", route.path)  # paths: [a-z0-9/_] only
                self._patterns.append((re.compile(f"^{regex}$"), route.path, methods))
            else:
                self._fixed.setdefault(route.path, {}).update(methods)
        self._lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets here: the server closes the connection
        path: str = scope["path"]
        methods, params = self._match(path)
        bare = path.rstrip("/")
        if methods is None and bare and bare != path and self._match(bare)[0] is not None:
            await _redirect(scope, send, bare)
            return
        request = Request(scope, receive)
        endpoint = methods.get(scope["method"]) if methods is not None else None
        if endpoint is None:
            why = "Not Found" if methods is None else "Method Not Allowed"
            status = 404 if methods is None else 405
            response = error_response(APIError(status, f"{scope['method']} {path}: {why}"))
        else:
            scope["path_params"] = params
            try:
                response = await endpoint(request)
            except APIError as exc:
                response = error_response(exc)
            except Exception:
                log.exception("%s %s failed", scope["method"], path)
                response = error_response(APIError(500, "internal error; see the server log"))
        await response(scope, receive, send)

    def template(self, path: str) -> str | None:
        """The route ``path`` falls under, as written (``/v1/fusion/runs/{run_id}``): what
        metrics count requests by."""
        if path in self._fixed:
            return path
        return next((t for pattern, t, _ in self._patterns if pattern.match(path)), None)

    def _match(self, path: str) -> tuple[dict[str, Endpoint] | None, dict[str, str]]:
        methods = self._fixed.get(path)
        if methods is not None:
            return methods, {}
        for pattern, _, methods in self._patterns:
            found = pattern.match(path)
            if found is not None:
                return methods, found.groupdict()
        return None, {}

    async def _serve_lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI lifespan: startup enters ``lifespan``, shutdown leaves it (a failure at either
        is reported to the server, which then stops)."""
        message = await receive()
        assert message["type"] == "lifespan.startup"
        context = self._lifespan() if self._lifespan is not None else None
        try:
            if context is not None:
                await context.__aenter__()
        except BaseException as exc:
            log.exception("startup failed")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        try:
            if context is not None:
                await context.__aexit__(None, None, None)
        except BaseException as exc:
            log.exception("shutdown failed")
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


class InFlightCap:
    """ASGI middleware: at most ``limit`` HTTP requests at once (``/health`` not counted);
    past it, 503 with ``Retry-After``, before the request costs anything else. 0: no cap."""

    def __init__(self, app: ASGIApp, limit: int, retry_after: int = 1) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.limit or scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            error = APIError(
                503,
                f"this server is at its limit of {self.limit} requests at once; "
                f"retry in {self.retry_after}s",
            )
            error.headers["Retry-After"] = str(self.retry_after)
            await error_response(error)(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def error_response(error: APIError) -> Response:
    return Response(error.encode(), error.status, error.headers, media_type="application/json")


async def _redirect(scope: Scope, send: Send, path: str) -> None:
    query = scope.get("query_string", b"")
    location = path.encode() + (b"?" + query if query else b"")
    headers = [(b"location", location), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 307, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


class EventStream(Response):
    """A ``text/event-stream`` response whose body is ``events``, each sent as it comes.

    The events are produced in a task of their own, while this one waits for the client to
    go away: then the producer is cancelled (its upstream calls with it). One task per
    response, not one per event, and no task group."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        # Not Response.__init__: it would declare the empty body's length.
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (producer, watcher):
                task.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
            closing: Any = getattr(self.events, "aclose", None)
            if closing is not None:  # a producer cancelled before it started leaves it open
                await closing()
        if producer.done() and not producer.cancelled() and producer.exception() is not None:
            raise producer.exception()  # type: ignore[misc]

    async def _produce(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        message: Message = {"type": "http.response.body", "body": b"", "more_body": True}
        async for event in self.events:
            await send({**message, "body": event})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
