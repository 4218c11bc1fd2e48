"""Server-side tools a panel member (or the judge) may call: ``web_search``, ``web_fetch``,
``run_code``; the protocol to add more (``Tool.from_function`` on a typed async function)."""

from openfusion.tools.address_policy import AddressPolicy, FetchRefused, Resolver
from openfusion.tools.base import (
    Source,
    Tool,
    ToolError,
    ToolOutput,
    ToolRegistry,
    ToolResult,
    tool,
)
from openfusion.tools.corpus import CorpusError, IndexStats, build_index
from openfusion.tools.defaults import default_tools
from openfusion.tools.fence import fence
from openfusion.tools.search import SearchBackend, SearchResults
from openfusion.tools.settings import ToolSettings, corpus_path

__all__ = [
    "AddressPolicy",
    "CorpusError",
    "FetchRefused",
    "IndexStats",
    "Resolver",
    "SearchBackend",
    "SearchResults",
    "Source",
    "Tool",
    "ToolError",
    "ToolOutput",
    "ToolRegistry",
    "ToolResult",
    "ToolSettings",
    "build_index",
    "corpus_path",
    "default_tools",
    "fence",
    "tool",
]
