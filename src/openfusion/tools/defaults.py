"""``default_tools``: the built-in tools for a ``Settings`` and a ``[tools]`` table.

``web_search`` (on the configured backend) and ``web_fetch`` always; ``run_code`` only when a
sandbox mode is enabled and available (``code = "auto"`` without bubblewrap leaves it out).
"""

from __future__ import annotations

from openfusion.settings import Settings
from openfusion.tools.address_policy import AddressPolicy, Resolver, system_resolver
from openfusion.tools.base import ToolRegistry
from openfusion.tools.fetch import FetchConfig, Fetcher, web_fetch_tool
from openfusion.tools.sandbox import Sandbox, SandboxConfig, resolve_mode, run_code_tool
from openfusion.tools.search import create_backend, web_search_tool
from openfusion.tools.settings import ToolSettings


def fetch_config(tool_settings: ToolSettings) -> FetchConfig:
    return FetchConfig(
        max_bytes=tool_settings.fetch_max_bytes,
        timeout=tool_settings.fetch_timeout,
        policy=AddressPolicy.from_allow_list(
            tool_settings.fetch_allow_hosts, tool_settings.deny_hosts
        ),
    )


def default_tools(
    settings: Settings,
    tool_settings: ToolSettings | None = None,
    *,
    resolver: Resolver = system_resolver,
) -> ToolRegistry:
    """The built-in tools. Raises ``ConfigError`` for a setting that cannot work (a search
    backend without its API key or URL, ``code = "bwrap"`` without bubblewrap)."""
    ts = tool_settings or ToolSettings()
    registry = ToolRegistry(output_max_chars=ts.output_max_chars)
    backend = create_backend(settings, ts)
    registry.register(web_search_tool(backend, ts.max_results, deny_hosts=ts.deny_hosts))
    registry.register(web_fetch_tool(Fetcher(fetch_config(ts), resolver)))
    mode = resolve_mode(ts.code)
    if mode is not None:
        sandbox = Sandbox(
            SandboxConfig(
                mode=mode,
                timeout=ts.code_timeout,
                memory_mb=ts.code_memory_mb,
                output_max_bytes=ts.output_max_chars,
            )
        )
        registry.register(run_code_tool(sandbox))
    return registry
