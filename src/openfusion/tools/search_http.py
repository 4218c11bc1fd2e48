"""The online ``web_search`` backends: SearXNG, Tavily, Brave and Exa, over aiohttp.

Each is one ``HTTPSearchBackend``: how to build the request, and how to read the answer into
``Source`` values. Keys come from ``TAVILY_API_KEY``, ``BRAVE_API_KEY`` and ``EXA_API_KEY``
through ``Settings.api_key``; a missing one is a ``ConfigError`` naming the variable. The API
base URL can be overridden (``[tools] search_api_url``: a proxy, or a mock on 127.0.0.1).

Cost per query is the provider's list price for the request made here (best effort, USD): Exa
reports the actual cost in its answer and that figure wins. SearXNG is self-hosted: 0.0.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from openfusion.errors import ConfigError
from openfusion.settings import Settings
from openfusion.tools.base import Source, ToolError
from openfusion.tools.search import SearchResults
from openfusion.tools.settings import ToolSettings

logger = logging.getLogger(__name__)

TAVILY_URL = "https://api.tavily.com"
BRAVE_URL = "https://api.search.brave.com"
EXA_URL = "https://api.exa.ai"

TAVILY_COST = 0.008  # 1 credit per basic search, pay-as-you-go price per credit
BRAVE_COST = 0.005  # $5 per 1,000 requests
EXA_COST = 0.005  # $5 per 1,000 searches with 1-25 results, when the answer does not say

SNIPPET_CHARS = 400
_TAG = re.compile(r"<[^>]+>")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    params: dict[str, str] | None = None
    body: dict[str, Any] | None = None


class HTTPSearchBackend:
    """One search API: ``build`` makes the request, ``parse`` reads hits and cost."""

    def __init__(
        self,
        name: str,
        *,
        build: Callable[[str, int], Request],
        parse: Callable[[Any, int], tuple[list[Source], float | None]],
        timeout: float,
        hint_on_forbidden: str,
        price: float,
    ) -> None:
        self.name = name
        self.price = price
        """The most one query costs (USD): what a budget reserves for it."""
        self._build = build
        self._parse = parse
        self._timeout = timeout
        self._hint_on_forbidden = hint_on_forbidden

    def __repr__(self) -> str:
        return f"HTTPSearchBackend({self.name!r})"

    async def search(self, query: str, max_results: int) -> SearchResults:
        request = self._build(query, max_results)
        data = await self._fetch_json(request)
        try:
            hits, cost = self._parse(data, max_results)
        except (TypeError, AttributeError, KeyError) as exc:
            raise ToolError(f"{self.name} answered in an unexpected shape ({exc})") from exc
        return SearchResults(hits=tuple(hits[:max_results]), cost=cost)

    async def _fetch_json(self, request: Request) -> Any:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    params=request.params,
                    json=request.body,
                ) as resp,
            ):
                body = await resp.read()
                status = resp.status
        except TimeoutError as exc:
            raise ToolError(
                f"{self.name} did not answer within {self._timeout:g} s: try again later",
                cost=None,
            ) from exc
        except aiohttp.ClientError as exc:
            raise ToolError(f"cannot reach {self.name}: {exc}", cost=None) from exc
        if status >= 400:
            logger.debug("%s answered HTTP %s: %r", self.name, status, body[:500])
            raise ToolError(self._status_message(status))
        try:
            return json.loads(body)
        except ValueError as exc:
            raise ToolError(f"{self.name} answered with something that is not JSON") from exc

    def _status_message(self, status: int) -> str:
        if status in (401, 403):
            return f"{self.name} refused the request (HTTP {status}): {self._hint_on_forbidden}"
        if status == 429:
            return f"{self.name} is rate limiting (HTTP 429): wait and try again"
        return f"{self.name} failed with HTTP {status}: try again later"


def _key(settings: Settings, backend: str, env_var: str) -> str:
    key = settings.api_key(env_var)
    if key is None:
        raise ConfigError(
            f"search backend {backend!r} needs an API key: set the environment variable "
            f'{env_var} (e.g. `export {env_var}=...`), or set search_backend = "corpus" '
            "under [tools] in config.toml for the offline index"
        )
    return key


def _text(value: Any) -> str:
    """A field of a result as plain text: tags dropped, entities decoded, spaces collapsed."""
    if not isinstance(value, str):
        return ""
    return " ".join(html.unescape(_TAG.sub("", value)).split())[:SNIPPET_CHARS]


def _sources(items: Any, backend: str, snippet: Callable[[dict[str, Any]], str]) -> list[Source]:
    out: list[Source] = []
    for item in items or []:
        if not isinstance(item, dict):
            continue
        url = item.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            continue
        title = _text(item.get("title")) or url
        out.append(Source(title=title, url=url, snippet=snippet(item), source=backend))
    return out


# --- SearXNG ---------------------------------------------------------------------------------


def create_searxng(settings: Settings, tool_settings: ToolSettings) -> HTTPSearchBackend:
    if not tool_settings.searxng_url:
        raise ConfigError(
            'search_backend = "searxng" needs the URL of your instance: set searxng_url '
            'under [tools] in config.toml, e.g. searxng_url = "http://127.0.0.1:8888"'
        )
    base = tool_settings.searxng_url.rstrip("/")

    def build(query: str, max_results: int) -> Request:
        return Request(
            "GET",
            f"{base}/search",
            {"Accept": "application/json"},
            params={"q": query, "format": "json"},
        )

    def parse(data: Any, max_results: int) -> tuple[list[Source], float | None]:
        return _sources(data.get("results"), "searxng", lambda r: _text(r.get("content"))), 0.0

    return HTTPSearchBackend(
        "searxng",
        build=build,
        parse=parse,
        timeout=tool_settings.fetch_timeout,
        hint_on_forbidden="enable the json format (search.formats: [html, json]) in the "
        "instance's settings.yml",
        price=0.0,
    )


# --- Tavily ----------------------------------------------------------------------------------


def create_tavily(settings: Settings, tool_settings: ToolSettings) -> HTTPSearchBackend:
    key = _key(settings, "tavily", "TAVILY_API_KEY")
    base = (tool_settings.search_api_url or TAVILY_URL).rstrip("/")

    def build(query: str, max_results: int) -> Request:
        return Request(
            "POST",
            f"{base}/search",
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            body={"query": query, "max_results": max_results, "search_depth": "basic"},
        )

    def parse(data: Any, max_results: int) -> tuple[list[Source], float | None]:
        return _sources(data.get("results"), "tavily", lambda r: _text(r.get("content"))), (
            TAVILY_COST
        )

    return HTTPSearchBackend(
        "tavily",
        build=build,
        parse=parse,
        timeout=tool_settings.fetch_timeout,
        hint_on_forbidden="check TAVILY_API_KEY",
        price=TAVILY_COST,
    )


# --- Brave -----------------------------------------------------------------------------------


def create_brave(settings: Settings, tool_settings: ToolSettings) -> HTTPSearchBackend:
    key = _key(settings, "brave", "BRAVE_API_KEY")
    base = (tool_settings.search_api_url or BRAVE_URL).rstrip("/")

    def build(query: str, max_results: int) -> Request:
        return Request(
            "GET",
            f"{base}/res/v1/web/search",
            {"X-Subscription-Token": key, "Accept": "application/json"},
            params={"q": query, "count": str(max_results)},
        )

    def parse(data: Any, max_results: int) -> tuple[list[Source], float | None]:
        web = data.get("web") or {}
        return _sources(web.get("results"), "brave", lambda r: _text(r.get("description"))), (
            BRAVE_COST
        )

    return HTTPSearchBackend(
        "brave",
        build=build,
        parse=parse,
        timeout=tool_settings.fetch_timeout,
        hint_on_forbidden="check BRAVE_API_KEY",
        price=BRAVE_COST,
    )


# --- Exa -------------------------------------------------------------------------------------


def create_exa(settings: Settings, tool_settings: ToolSettings) -> HTTPSearchBackend:
    key = _key(settings, "exa", "EXA_API_KEY")
    base = (tool_settings.search_api_url or EXA_URL).rstrip("/")

    def build(query: str, max_results: int) -> Request:
        return Request(
            "POST",
            f"{base}/search",
            {"x-api-key": key, "Content-Type": "application/json"},
            body={"query": query, "numResults": max_results, "contents": {"highlights": True}},
        )

    def snippet(item: dict[str, Any]) -> str:
        highlights = item.get("highlights")
        if isinstance(highlights, list) and highlights:
            return _text(" … ".join(h for h in highlights if isinstance(h, str)))
        return _text(item.get("summary")) or _text(item.get("text"))

    def parse(data: Any, max_results: int) -> tuple[list[Source], float | None]:
        reported = (data.get("costDollars") or {}).get("total")
        cost = float(reported) if isinstance(reported, int | float) else EXA_COST
        return _sources(data.get("results"), "exa", snippet), cost

    return HTTPSearchBackend(
        "exa",
        build=build,
        parse=parse,
        timeout=tool_settings.fetch_timeout,
        hint_on_forbidden="check EXA_API_KEY",
        price=EXA_COST,
    )
