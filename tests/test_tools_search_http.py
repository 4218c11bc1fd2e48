"""The online search backends, against a mock API on 127.0.0.1: requests, normalisation, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from openfusion.errors import ConfigError
from openfusion.settings import Settings
from openfusion.tools import Source, ToolError, ToolSettings, default_tools
from openfusion.tools.search import create_backend

KEYS = {"TAVILY_API_KEY": "tv-key", "BRAVE_API_KEY": "br-key", "EXA_API_KEY": "exa-key"}


@dataclass
class MockAPI:
    """Answers every request with ``reply`` (JSON) and ``status``; records what it got."""

    reply: Any = field(default_factory=dict)
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "json": json.loads(body) if body else None,
            }
        )
        return web.json_response(self.reply, status=self.status)


@pytest.fixture
async def api() -> AsyncIterator[MockAPI]:
    mock = MockAPI()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", mock.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    mock.url = str(server.make_url(""))
    yield mock
    await server.close()


def settings(tmp_path: Path, env: dict[str, str] | None = None) -> Settings:
    return Settings(config_dir=tmp_path / "c", cache_dir=tmp_path / "k", env=env or {})


def backend_for(name: str, api: MockAPI, tmp_path: Path, **extra: Any):  # type: ignore[no-untyped-def]
    ts = ToolSettings(
        search_backend=name,  # type: ignore[arg-type]
        searxng_url=api.url,
        search_api_url=api.url,
        **extra,
    )
    return create_backend(settings(tmp_path, KEYS), ts)


async def test_searxng(api: MockAPI, tmp_path: Path) -> None:
    api.reply = {
        "results": [
            {"title": "Tides", "url": "https://a.example/tides", "content": "Moon &amp; tides"},
            {"title": "No URL", "content": "dropped"},
            {"title": "Ftp", "url": "ftp://a.example/x", "content": "dropped too"},
            {"title": "", "url": "https://b.example/", "content": "<b>bold</b>  text"},
            {"title": "Third", "url": "https://c.example/", "content": "c"},
        ]
    }
    found = await backend_for("searxng", api, tmp_path).search("tides moon", 2)
    assert found.hits == (
        Source("Tides", "https://a.example/tides", "Moon & tides", "searxng"),
        Source("https://b.example/", "https://b.example/", "bold text", "searxng"),
    )
    assert found.cost == 0.0
    req = api.requests[0]
    assert (req["method"], req["path"]) == ("GET", "/search")
    assert req["query"] == {"q": "tides moon", "format": "json"}


async def test_tavily(api: MockAPI, tmp_path: Path) -> None:
    api.reply = {
        "query": "q",
        "results": [
            {"title": "T1", "url": "https://t1.example/", "content": "first", "score": 0.9},
            {"title": "T2", "url": "https://t2.example/", "content": "second", "score": 0.5},
        ],
    }
    found = await backend_for("tavily", api, tmp_path).search("what is fusion", 3)
    assert found.hits == (
        Source("T1", "https://t1.example/", "first", "tavily"),
        Source("T2", "https://t2.example/", "second", "tavily"),
    )
    assert found.cost == pytest.approx(0.008)
    req = api.requests[0]
    assert (req["method"], req["path"]) == ("POST", "/search")
    assert req["headers"]["Authorization"] == "Bearer tv-key"
    assert req["json"] == {"query": "what is fusion", "max_results": 3, "search_depth": "basic"}


async def test_brave(api: MockAPI, tmp_path: Path) -> None:
    api.reply = {
        "web": {
            "results": [
                {
                    "title": "The <strong>Sun</strong>",
                    "url": "https://sun.example/",
                    "description": "Our <strong>star</strong> &amp; more",
                }
            ]
        }
    }
    found = await backend_for("brave", api, tmp_path).search("sun", 4)
    assert found.hits == (Source("The Sun", "https://sun.example/", "Our star & more", "brave"),)
    assert found.cost == pytest.approx(0.005)
    req = api.requests[0]
    assert (req["method"], req["path"]) == ("GET", "/res/v1/web/search")
    assert req["query"] == {"q": "sun", "count": "4"}
    assert req["headers"]["X-Subscription-Token"] == "br-key"


async def test_exa(api: MockAPI, tmp_path: Path) -> None:
    api.reply = {
        "results": [
            {"title": "E1", "url": "https://e1.example/", "highlights": ["one.", "two."]},
            {"title": "E2", "url": "https://e2.example/", "text": "full text of e2"},
        ],
        "costDollars": {"total": 0.012},
    }
    found = await backend_for("exa", api, tmp_path).search("fusion power", 5)
    assert found.hits == (
        Source("E1", "https://e1.example/", "one. … two.", "exa"),
        Source("E2", "https://e2.example/", "full text of e2", "exa"),
    )
    assert found.cost == pytest.approx(0.012)  # the cost Exa reports wins over the list price
    req = api.requests[0]
    assert req["headers"]["x-api-key"] == "exa-key"
    assert req["json"]["query"] == "fusion power" and req["json"]["numResults"] == 5


async def test_exa_without_reported_cost_uses_list_price(api: MockAPI, tmp_path: Path) -> None:
    api.reply = {"results": []}
    found = await backend_for("exa", api, tmp_path).search("x", 5)
    assert found.hits == () and found.cost == pytest.approx(0.005)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, r"tavily refused the request \(HTTP 401\): check TAVILY_API_KEY"),
        (429, "rate limiting"),
        (500, "HTTP 500"),
    ],
)
async def test_http_errors_become_tool_errors(
    api: MockAPI, tmp_path: Path, status: int, message: str
) -> None:
    api.status, api.reply = status, {"error": "nope"}
    with pytest.raises(ToolError, match=message):
        await backend_for("tavily", api, tmp_path).search("x", 5)


async def test_searxng_without_json_format_says_how_to_enable_it(
    api: MockAPI, tmp_path: Path
) -> None:
    api.status = 403
    with pytest.raises(ToolError, match=r"enable the json format"):
        await backend_for("searxng", api, tmp_path).search("x", 5)


async def test_unexpected_shape_is_a_tool_error(api: MockAPI, tmp_path: Path) -> None:
    api.reply = ["not", "an", "object"]
    with pytest.raises(ToolError, match="unexpected shape"):
        await backend_for("brave", api, tmp_path).search("x", 5)


async def test_unreachable_api_is_a_tool_error(tmp_path: Path) -> None:
    ts = ToolSettings(search_backend="tavily", search_api_url="http://127.0.0.1:9")
    backend = create_backend(settings(tmp_path, KEYS), ts)
    with pytest.raises(ToolError, match="cannot reach tavily"):
        await backend.search("x", 5)


@pytest.mark.parametrize(
    ("backend", "variable"),
    [("tavily", "TAVILY_API_KEY"), ("brave", "BRAVE_API_KEY"), ("exa", "EXA_API_KEY")],
)
def test_missing_key_names_the_variable(tmp_path: Path, backend: str, variable: str) -> None:
    ts = ToolSettings(search_backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"set the environment variable {variable}"):
        default_tools(settings(tmp_path), ts)


def test_searxng_needs_its_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set searxng_url"):
        default_tools(settings(tmp_path), ToolSettings(search_backend="searxng"))


async def test_web_search_tool_over_http_backend(api: MockAPI, tmp_path: Path) -> None:
    api.reply = {"results": [{"title": "T", "url": "https://t.example/", "content": "c"}]}
    ts = ToolSettings(search_backend="tavily", search_api_url=api.url, code="off")
    tools = default_tools(settings(tmp_path, KEYS), ts)
    result = await tools.call("web_search", '{"query": "t"}')
    assert result.ok and result.cost == pytest.approx(0.008)
    assert "[1] T\nURL: https://t.example/\nc" in result.content
    assert api.requests[0]["json"]["max_results"] == 5  # the configured default
