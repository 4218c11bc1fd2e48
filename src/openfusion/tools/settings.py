"""``ToolSettings``: the ``[tools]`` table of ``config.toml``.

::

    [tools]
    search_backend = "corpus"        # corpus (offline, default) | searxng | tavily | brave | exa
    corpus_path = "/data/corpus.sqlite"  # default: <cache dir>/corpus.sqlite
    searxng_url = "http://127.0.0.1:8888"
    max_results = 5                  # default results per search (the model may ask for up to 20)
    fetch_max_bytes = 2097152
    fetch_timeout = 15.0             # seconds, for web_fetch and the HTTP search backends
    fetch_allow_hosts = []           # hosts, IPs or CIDRs web_fetch may reach although private
    deny_hosts = []                  # hosts (and their subdomains) no tool may read: web_search
                                     # drops their results, web_fetch refuses them
    code = "auto"                    # auto (bwrap if installed, else off) | bwrap
                                     # | unsandboxed (weak, opt-in) | off
    code_timeout = 10.0
    code_memory_mb = 256
    output_max_chars = 8000          # per tool result, after which it is cut
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openfusion.settings import Settings

SearchBackendName = Literal["corpus", "searxng", "tavily", "brave", "exa"]
CodeMode = Literal["auto", "bwrap", "unsandboxed", "off"]

MAX_RESULTS_CAP = 20
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class ToolSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    search_backend: SearchBackendName = "corpus"
    corpus_path: Path | None = None
    """The SQLite index of ``openfusion index``; ``None``: ``<cache dir>/corpus.sqlite``."""
    searxng_url: str | None = None
    """Base URL of a SearXNG instance (its JSON format must be enabled)."""
    search_api_url: str | None = None
    """Overrides the API endpoint of tavily / brave / exa (a proxy, or a mock in tests)."""
    max_results: int = Field(5, ge=1, le=MAX_RESULTS_CAP)
    fetch_max_bytes: int = Field(2 * 1024 * 1024, gt=0)
    fetch_timeout: float = Field(15.0, gt=0)
    fetch_allow_hosts: tuple[str, ...] = ()
    """Host names, IP addresses or CIDR networks that ``web_fetch`` may reach even though they
    are private, loopback or otherwise refused. Empty: public internet addresses only."""
    deny_hosts: tuple[str, ...] = ()
    """Host names that no tool may read, with their subdomains: ``web_search`` drops results
    from them and ``web_fetch`` refuses them (an eval keeps a benchmark's own hosts out)."""
    code: CodeMode = "auto"
    code_timeout: float = Field(10.0, gt=0)
    code_memory_mb: int = Field(256, ge=32)
    output_max_chars: int = Field(8000, ge=100)

    @field_validator("fetch_allow_hosts")
    @classmethod
    def _valid_hosts(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        cleaned: list[str] = []
        for entry in entries:
            value = entry.strip().lower().rstrip(".")
            if value.startswith("[") and value.endswith("]"):
                value = value[1:-1]
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                if not _HOSTNAME.match(value):
                    raise ValueError(
                        f"{entry!r} is neither a host name, an IP address nor a CIDR network "
                        "(e.g. 'intranet.example', '127.0.0.1', '10.1.0.0/16')"
                    ) from None
            cleaned.append(value)
        return tuple(cleaned)

    @field_validator("deny_hosts")
    @classmethod
    def _valid_names(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(entry.strip().lower().rstrip(".") for entry in entries)
        for entry, value in zip(entries, cleaned, strict=True):
            if not _HOSTNAME.match(value):
                raise ValueError(f"{entry!r} is not a host name (e.g. 'huggingface.co')")
        return cleaned


def corpus_path(settings: Settings, tool_settings: ToolSettings) -> Path:
    """Where the corpus index lives: ``[tools] corpus_path``, else ``<cache dir>/corpus.sqlite``."""
    return tool_settings.corpus_path or settings.cache_dir / "corpus.sqlite"
