"""The plain ASGI layer: routing, JSON errors, lifespan, the in-flight cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from helpers import eventually
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from openfusion.server.asgi import InFlightCap, Route, Routes
from openfusion.server.sse import with_keepalive


async def call(
    app: Any, method: str = "GET", path: str = "/v1/x"
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP request to ``app``: status, headers, body."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body


async def echo(request: Request) -> Response:
    return JSONResponse({"path_params": request.path_params})


async def test_routes_answer_and_everything_else_is_a_json_error() -> None:
    app = Routes([Route("/v1/x", echo), Route("/v1/runs/{run_id}", echo, ["GET", "DELETE"])])
    status, _, body = await call(app)
    assert status == 200 and json.loads(body) == {"path_params": {}}
    status, _, body = await call(app, path="/v1/runs/abc")
    assert status == 200 and json.loads(body) == {"path_params": {"run_id": "abc"}}
    assert (await call(app, "DELETE", "/v1/runs/abc"))[0] == 200
    status, headers, body = await call(app, "POST", "/v1/x")
    assert status == 405 and headers[b"content-type"] == b"application/json"
    assert json.loads(body)["error"]["message"] == "POST /v1/x: Method Not Allowed"
    status, _, body = await call(app, path="/v1/runs/abc/more")
    assert (
        status == 404 and json.loads(body)["error"]["message"] == "GET /v1/runs/abc/more: Not Found"
    )
    status, headers, _ = await call(app, path="/v1/x/")
    assert status == 307 and headers[b"location"] == b"/v1/x"


async def test_an_endpoint_that_crashes_is_a_500_without_details() -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("secret detail")

    status, _, body = await call(Routes([Route("/v1/x", broken)]))
    assert status == 500 and b"secret detail" not in body
    assert json.loads(body)["error"]["message"] == "internal error; see the server log"


async def test_lifespan_enters_at_startup_and_leaves_at_shutdown() -> None:
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        seen.append("up")
        yield
        seen.append("down")

    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await Routes([], lifespan)({"type": "lifespan"}, receive, send)
    assert seen == ["up", "down"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_past_the_in_flight_cap_a_request_gets_503_and_retry_after() -> None:
    release = asyncio.Event()
    entered: list[str] = []

    async def held(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(scope["path"])
        await release.wait()
        await JSONResponse({})(scope, receive, send)

    app = InFlightCap(held, limit=2)
    first = asyncio.create_task(call(app))
    second = asyncio.create_task(call(app))
    await eventually(lambda: len(entered) == 2, "two requests in flight")
    status, headers, body = await call(app)
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert "limit of 2 requests at once" in json.loads(body)["error"]["message"]
    health = asyncio.create_task(call(app, path="/health"))  # never refused
    await eventually(lambda: len(entered) == 3, "health let through")
    release.set()
    assert [(await t)[0] for t in (first, second, health)] == [200, 200, 200]
    assert app.in_flight == 0
    assert (await call(app))[0] == 200  # room again
    assert (await call(InFlightCap(held, limit=0)))[0] == 200  # 0: no cap


async def test_stream_items_ready_together_go_out_together() -> None:
    """``with_keepalive`` hands over everything queued at once (one write for chunks that
    arrived in one packet), never holds a lone item back, ticks while the source is quiet, and
    delivers what came before a failure before raising it."""
    release = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        for n in (1, 2, 3):  # ready at once, as chunks parsed from one read
            yield n
        await release.wait()
        yield 4
        await asyncio.sleep(0.3)  # quiet: a keepalive tick
        yield 5
        raise RuntimeError("upstream gone")

    seen: list[list[int] | None] = []
    batches = with_keepalive(source(), 0.1)
    try:
        async for batch in batches:
            seen.append(batch)
            release.set()
            assert len(seen) < 20, seen
    except RuntimeError as exc:
        assert str(exc) == "upstream gone"
    else:
        raise AssertionError("the failure was swallowed")
    assert seen[0] == [1, 2, 3] and seen[1] == [4]
    assert seen[2:-1] and set(map(str, seen[2:-1])) == {"None"} and seen[-1] == [5]
