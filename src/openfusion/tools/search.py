"""``web_search``: one tool, several backends behind one small protocol.

The backend is picked by name from ``BACKENDS`` (name -> ``"module:factory"``, imported on
first use), never by testing names: ``corpus`` (offline SQLite FTS5, the default), ``searxng``,
``tavily``, ``brave``, ``exa``. A factory gets the settings and raises ``ConfigError`` when it
cannot work (a missing API key names its variable), so a bad config fails before any call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Protocol, cast

from pydantic import Field

from openfusion.settings import Settings
from openfusion.tools.address_policy import denied_host
from openfusion.tools.base import Source, Tool, ToolOutput
from openfusion.tools.settings import MAX_RESULTS_CAP, ToolSettings


@dataclass(frozen=True, slots=True)
class SearchResults:
    hits: tuple[Source, ...]
    cost: float | None
    """USD for this query; ``0.0`` for local backends, ``None`` when unknown."""


class SearchBackend(Protocol):
    """``name``; and ``price``, the most one query costs (USD), when the backend knows it."""

    name: str

    async def search(self, query: str, max_results: int) -> SearchResults:
        """Raise ``ToolError`` with a message the model (or operator) can act on."""
        ...


BackendFactory = Callable[[Settings, ToolSettings], SearchBackend]

BACKENDS: dict[str, str] = {
    "corpus": "openfusion.tools.corpus:create",
    "searxng": "openfusion.tools.search_http:create_searxng",
    "tavily": "openfusion.tools.search_http:create_tavily",
    "brave": "openfusion.tools.search_http:create_brave",
    "exa": "openfusion.tools.search_http:create_exa",
}


def create_backend(settings: Settings, tool_settings: ToolSettings) -> SearchBackend:
    """The backend named by ``tool_settings.search_backend``."""
    module_name, _, factory_name = BACKENDS[tool_settings.search_backend].partition(":")
    factory = cast(BackendFactory, getattr(importlib.import_module(module_name), factory_name))
    return factory(settings, tool_settings)


Query = Annotated[
    str, Field(min_length=1, max_length=500, description="What to search for: a few keywords.")
]
MaxResults = Annotated[
    int, Field(ge=1, le=MAX_RESULTS_CAP, description="How many results to return.")
]


def web_search_tool(
    backend: SearchBackend, default_max_results: int = 5, *, deny_hosts: Sequence[str] = ()
) -> Tool:
    """The ``web_search`` tool over ``backend``; results from ``deny_hosts`` (and their
    subdomains) are dropped before the model sees them."""

    async def web_search(query: Query, max_results: MaxResults = default_max_results) -> ToolOutput:
        """Search for documents. Returns numbered results, each with its title, URL and a
        snippet; cite a result by its URL, and read a page in full with web_fetch."""
        found = await backend.search(query, max_results)
        hits = tuple(h for h in found.hits if denied_host(h.url, deny_hosts) is None)
        found = SearchResults(hits, found.cost)
        if not found.hits:
            text = f"No results for {query!r}. Try other or fewer keywords."
            return ToolOutput(text=text, cost=found.cost)
        return ToolOutput(text=format_hits(found.hits), sources=found.hits, cost=found.cost)

    # A backend that does not say what a query costs is of unknown price (refused under a budget).
    return Tool.from_function(web_search, price=getattr(backend, "price", None))


def format_hits(hits: tuple[Source, ...]) -> str:
    return "\n\n".join(
        f"[{i}] {hit.title}\nURL: {hit.url}\n{hit.snippet}" for i, hit in enumerate(hits, 1)
    )
