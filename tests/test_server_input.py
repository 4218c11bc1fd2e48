"""Malformed requests to a real server: each is a 4xx whose message names the field or the
problem, never a 500, and none reaches a model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from server_fixtures import Demo, RunningServer, setup_demo

Serve = Callable[..., RunningServer]
MAX_BODY = 1000
USER = {"role": "user", "content": "Who wrote Pride and Prejudice?"}
VALID: dict[str, Any] = {"model": "openfusion/demo", "messages": [USER]}


def body(**changes: Any) -> bytes:
    """The valid request with ``changes`` (a value of ``...`` removes the field)."""
    data = {**VALID, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


# (id, raw body, extra headers, status, fragments the error message must contain)
CASES: list[tuple[str, bytes, dict[str, str], int, list[str]]] = [
    ("malformed json", b'{"model": "openfusion/demo", ', {}, 400, ["not valid JSON"]),
    ("empty body", b"", {}, 400, ["empty request body"]),
    ("json array", b"[1, 2]", {}, 400, ["must be a JSON object"]),
    ("json string", b'"hello"', {}, 400, ["must be a JSON object"]),
    ("missing model", body(model=...), {}, 400, ["model: Field required"]),
    ("empty model", body(model=""), {}, 400, ["model: String should have at least 1 character"]),
    ("model not a string", body(model=7), {}, 400, ["model: Input should be a valid string"]),
    ("missing messages", body(messages=...), {}, 400, ["messages: Field required"]),
    ("empty messages", body(messages=[]), {}, 400, ["messages: List should have at least 1"]),
    (
        "no user text",
        body(
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": " "}]
        ),
        {},
        400,
        ["messages", "needs at least one user message with text"],
    ),
    (
        "wrong role",
        body(messages=[{"role": "robot", "content": "hi"}, USER]),
        {},
        400,
        ["messages.0.role", "'user'"],
    ),
    ("temperature as string", body(temperature="0.5"), {}, 400, ["temperature"]),
    ("temperature 5", body(temperature=5), {}, 400, ["temperature", "less than or equal to 2"]),
    ("max_tokens 0", body(max_tokens=0), {}, 400, ["max_tokens", "greater than 0"]),
    ("stream as string", body(stream="yes"), {}, 400, ["stream", "valid boolean"]),
    (
        "unknown plugin",
        body(plugins=[{"id": "web"}]),
        {},
        400,
        ["plugins.0.id", "unsupported plugin 'web'"],
    ),
    (
        "nine analysis models",
        body(plugins=[{"id": "fusion", "analysis_models": ["demo/a"] * 9}]),
        {},
        400,
        ["plugins.0.analysis_models", "at most 8"],
    ),
    (
        "max_tool_calls 17",
        body(plugins=[{"id": "fusion", "max_tool_calls": 17}]),
        {},
        400,
        ["plugins.0.max_tool_calls", "less than or equal to 16"],
    ),
    (
        "unknown plugin field",
        body(plugins=[{"id": "fusion", "judge": "demo/judge"}]),
        {},
        400,
        ["plugins.0.judge", "Extra inputs are not permitted"],
    ),
    (
        "unknown tool type",
        body(tools=[{"type": "web_search"}]),
        {},
        400,
        ["tools.0.type", "unsupported tool type 'web_search'"],
    ),
    (
        "image content part",
        body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        ),
        {},
        400,
        ["messages.0.content", "only text content parts are supported, not 'image_url'"],
    ),
    ("n 2", body(n=2), {}, 400, ["n: Input should be less than or equal to 1"]),
    ("unknown preset", body(model="openfusion/nope"), {}, 400, ["unknown preset 'nope'"]),
    ("unknown provider", body(model="nope/x"), {}, 400, ["unknown provider 'nope'"]),
    ("model without provider", body(model="gpt"), {}, 400, ["must look like 'provider/model'"]),
    (
        "bad fallback model",
        body(model="demo/a", models=["nope/x"]),
        {},
        400,
        ["unknown provider 'nope'"],
    ),
    (
        "bad depth header",
        body(),
        {"x-openfusion-depth": "abc"},
        400,
        ["x-openfusion-depth", "non-negative integer"],
    ),
    (
        "negative depth header",
        body(),
        {"x-openrouter-fusion-depth": "-1"},
        400,
        ["x-openrouter-fusion-depth", "non-negative integer"],
    ),
    (
        "oversize body",
        body(messages=[{"role": "user", "content": "x" * MAX_BODY}]),
        {},
        400,
        [f"exceeds the {MAX_BODY}-byte limit"],
    ),
]


async def send(
    server: RunningServer,
    data: Any = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/v1/chat/completions",
) -> tuple[int, str, Any]:
    """(status, content type, decoded JSON body) of one request (sent as JSON unless
    ``headers`` say otherwise)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.url + path, data=data, headers=headers) as resp,
    ):
        text = await resp.text()
        assert resp.status < 500, text
        return resp.status, resp.content_type, json.loads(text)


@pytest.fixture
def demo() -> Demo:
    return setup_demo(f"[server]\nmax_body_bytes = {MAX_BODY}\n")


@pytest.fixture
def server(serve: Serve, demo: Demo) -> RunningServer:
    return serve(demo.settings, demo.registry)


async def test_the_valid_request_is_answered(server: RunningServer) -> None:
    """The control: without its flaw, the request of every case below is fine."""
    status, _, answer = await send(server, body())
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("raw", "headers", "status", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_malformed_request(
    server: RunningServer,
    demo: Demo,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    fragments: list[str],
) -> None:
    got, content_type, answer = await send(
        server, raw, {"Content-Type": "application/json", **headers}
    )
    assert got == status, answer
    assert content_type == "application/json"
    assert answer["error"]["code"] == status
    for fragment in fragments:
        assert fragment in answer["error"]["message"]
    assert demo.provider.calls == []


@pytest.mark.parametrize("stream", [False, True])
async def test_bad_request_is_a_400_even_for_a_stream(server: RunningServer, stream: bool) -> None:
    status, content_type, answer = await send(server, body(model="openfusion/nope", stream=stream))
    assert (status, content_type) == (400, "application/json")
    assert "unknown preset 'nope'" in answer["error"]["message"]


async def test_oversize_body_without_content_length(server: RunningServer) -> None:
    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 400  # JSON whitespace: valid if it were allowed to be this long

    status, _, answer = await send(server, chunked())
    assert status == 400
    assert f"exceeds the {MAX_BODY}-byte limit" in answer["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("GET", "/v1/chat/completions", 405, "GET /v1/chat/completions: Method Not Allowed"),
        ("PUT", "/v1/chat/completions", 405, "Method Not Allowed"),
        ("GET", "/v1/nope", 404, "GET /v1/nope: Not Found"),
        ("POST", "/v1/completions", 404, "Not Found"),
        ("GET", "/v1/generation", 400, "id: the query parameter is required"),
    ],
)
async def test_wrong_method_or_route_is_a_json_error(
    server: RunningServer, method: str, path: str, status: int, fragment: str
) -> None:
    got, content_type, answer = await send(server, method=method, path=path)
    assert (got, content_type) == (status, "application/json")
    assert answer["error"]["code"] == status
    assert fragment in answer["error"]["message"]
