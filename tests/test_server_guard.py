"""A server without API keys answers programs, not web pages (``server/guard.py``): JSON bodies
only, loopback ``Host`` names only (DNS rebinding), no foreign ``Origin`` (CSRF) unless CORS is
configured. A request with a key is not held to any of it. Real server, real HTTP."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from helpers import create_key
from server_fixtures import Demo, RunningServer, setup_demo

BODY = json.dumps(
    {"model": "openfusion/demo", "messages": [{"role": "user", "content": "Who wrote Emma?"}]}
)
JSON = {"Content-Type": "application/json"}


async def send(
    server: RunningServer,
    headers: dict[str, str],
    *,
    method: str = "POST",
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, server.url + path, data=BODY if method == "POST" else None, headers=headers
        ) as resp,
    ):
        text = await resp.text()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, text


def port(server: RunningServer) -> str:
    return server.url.rsplit(":", 1)[1]


@pytest.fixture
def demo() -> Demo:
    return setup_demo()


@pytest.fixture
def server(serve: Any, demo: Demo) -> RunningServer:
    return serve(demo.settings, demo.registry)  # type: ignore[no-any-return]


async def test_a_json_request_from_a_program_is_answered(server: RunningServer, demo: Demo) -> None:
    status, _, text = await send(server, JSON)
    assert status == 200, text
    for host in (f"localhost:{port(server)}", "127.0.0.1", f"[::1]:{port(server)}", "LOCALHOST."):
        status, _, text = await send(server, {**JSON, "Host": host})
        assert status == 200, (host, text)
    # the server's own pages may call it (the Origin is the Host)
    origin = {"Origin": f"http://127.0.0.1:{port(server)}"}
    status, _, text = await send(server, {**JSON, **origin})
    assert status == 200, text


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_a_body_that_is_not_declared_json_is_refused(
    server: RunningServer, demo: Demo, content_type: str | None
) -> None:
    """What a page can send cross-site without a preflight (the body is valid JSON)."""
    headers = {"Content-Type": content_type} if content_type else {}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as session,
        session.post(server.base_url + "/chat/completions", data=BODY, headers=headers) as resp,
    ):
        assert resp.status == 415, await resp.text()
        error = (await resp.json())["error"]
    assert "Content-Type: application/json" in error["message"]
    assert demo.models_called() == []


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1", ""]
)
async def test_a_foreign_host_is_refused(server: RunningServer, demo: Demo, host: str) -> None:
    """DNS rebinding: the page's own name, resolved to 127.0.0.1, arrives as its Host."""
    status, _, text = await send(server, {**JSON, "Host": host, "Origin": f"http://{host}"})
    assert status == 421, text
    assert "[server] allowed_hosts" in json.loads(text)["error"]["message"]
    assert demo.models_called() == []


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:1"])
async def test_a_cross_origin_request_is_refused(
    server: RunningServer, demo: Demo, origin: str
) -> None:
    status, _, text = await send(server, {**JSON, "Origin": origin})
    assert status == 403, text
    assert "[server] cors_origins" in json.loads(text)["error"]["message"]
    status, _, _ = await send(
        server,
        {"Origin": origin, "Access-Control-Request-Method": "POST"},
        method="OPTIONS",
    )
    assert status == 403  # no preflight passes either
    assert demo.models_called() == []


async def test_health_answers_any_host(server: RunningServer) -> None:
    status, _, _ = await send(server, {"Host": "lb-probe.internal"}, method="GET", path="/health")
    assert status == 200


async def test_configured_hosts_and_origins_are_allowed_with_cors(serve: Any) -> None:
    demo = setup_demo(
        '[server]\nallowed_hosts = ["fusion.lan"]\ncors_origins = ["https://app.example"]\n'
    )
    server = serve(demo.settings, demo.registry)
    status, _, text = await send(server, {**JSON, "Host": f"fusion.lan:{port(server)}"})
    assert status == 200, text
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, _ = await send(server, preflight, method="OPTIONS")
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://app.example"
    status, headers, text = await send(server, {**JSON, "Origin": "https://app.example"})
    assert status == 200, text
    assert headers["access-control-allow-origin"] == "https://app.example"
    status, headers, _ = await send(server, {**JSON, "Origin": "https://other.example"})
    assert status == 403 and "access-control-allow-origin" not in headers


async def test_a_request_with_a_key_is_not_held_to_the_browser_rules(serve: Any) -> None:
    demo = setup_demo()
    _, key = create_key(demo.settings, "ci")
    server = serve(demo.settings, demo.registry)
    auth = {"Authorization": f"Bearer {key}"}
    headers = {**auth, "Content-Type": "text/plain", "Host": "gateway.example"}
    status, _, text = await send(server, {**headers, "Origin": "https://tool.example"})
    assert status == 200, text
    status, _, _ = await send(server, {"Content-Type": "text/plain", "Host": "gateway.example"})
    assert status == 401  # without the key: refused at the door, as before
