"""``web_fetch``: read one web page as text, without letting a URL reach inside the network.

Every hop (the URL, then each redirect, at most ``MAX_REDIRECTS``) is vetted by
``AddressPolicy.vet`` before any connection: the host is normalised, resolved once, and every
address checked. The connection then goes only to the vetted addresses: aiohttp gets a
``PinnedResolver`` that answers with exactly those and fails for any other name, so a DNS answer
that changes between the check and the connect (rebinding) is never seen. Proxies from the
environment are ignored. The whole fetch, redirects included, has one time budget; the body is
read up to ``max_bytes`` and then cut (the output says so). Only HTML, XHTML, plain text, JSON
and PDF are read; HTML becomes its main text (trafilatura), PDF its page text (pypdf).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Annotated

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import Field
from yarl import URL

from openfusion.tools.address_policy import AddressPolicy, Resolver, system_resolver
from openfusion.tools.base import Source, Tool, ToolError, ToolOutput
from openfusion.tools.extract import ExtractionError, html_to_text, pdf_to_text

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CONTENT_KINDS = {
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/plain": "text",
    "application/json": "text",
    "application/pdf": "pdf",
}
USER_AGENT = "openfusion-web-fetch/0.1 (+https://github.com/openfusion)"
SNIPPET_CHARS = 300
READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class FetchConfig:
    max_bytes: int = 2 * 1024 * 1024
    timeout: float = 15.0
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    max_redirects: int = MAX_REDIRECTS


@dataclass(frozen=True, slots=True)
class Page:
    url: str
    """The final URL, after redirects."""
    title: str | None
    text: str
    content_type: str
    truncated: bool
    """The body was longer than ``max_bytes`` and was cut there."""


class PinnedResolver(AbstractResolver):
    """Answers aiohttp's lookups from vetted addresses only; an unvetted name is an error."""

    def __init__(self) -> None:
        self.pins: dict[str, tuple[str, ...]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.pins.get(host.lower().rstrip("."))
        if addresses is None:
            raise OSError(f"{host} was not vetted for this fetch")
        results: list[ResolveResult] = []
        for address in addresses:
            addr_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, addr_family):
                results.append(
                    ResolveResult(
                        hostname=host,
                        host=address,
                        port=port,
                        family=addr_family,
                        proto=0,
                        flags=socket.AI_NUMERICHOST,
                    )
                )
        if not results:
            raise OSError(f"{host} has no vetted address of family {family!r}")
        return results

    async def close(self) -> None:
        return None


class Fetcher:
    """Fetches pages under ``config``; ``resolver`` is injectable (tests stub DNS with it)."""

    def __init__(self, config: FetchConfig, resolver: Resolver = system_resolver) -> None:
        self.config = config
        self._resolver = resolver

    async def fetch(self, url: str) -> Page:
        try:
            async with asyncio.timeout(self.config.timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise ToolError(
                f"{url} did not load within {self.config.timeout:g} s: try another source",
                cost=0.0,
            ) from None

    async def _fetch(self, url: str) -> Page:
        try:
            current = URL(url.strip())
        except (ValueError, TypeError) as exc:
            raise ToolError(f"{url!r} is not a valid URL: {exc}") from exc
        pinned = PinnedResolver()
        resolved: dict[str, tuple[str, ...]] = {}
        connector = aiohttp.TCPConnector(resolver=pinned, use_dns_cache=False)
        headers = {"User-Agent": USER_AGENT, "Accept": ", ".join(CONTENT_KINDS)}
        async with aiohttp.ClientSession(
            connector=connector, headers=headers, trust_env=False
        ) as session:
            for _ in range(self.config.max_redirects + 1):
                target = await self.config.policy.vet(current, self._resolver, resolved)
                if target.name is not None:
                    pinned.pins[target.name] = target.addresses
                try:
                    async with session.get(target.url, allow_redirects=False) as resp:
                        location = resp.headers.get("Location")
                        if resp.status in REDIRECT_STATUSES and location:
                            current = _redirect(target.url, location)
                            continue
                        return await self._read(target.url, resp)
                except aiohttp.ClientError as exc:
                    raise ToolError(f"cannot fetch {target.url}: {exc}") from exc
        raise ToolError(f"{url} redirected more than {self.config.max_redirects} times")

    async def _read(self, url: URL, resp: aiohttp.ClientResponse) -> Page:
        if resp.status >= 400:
            raise ToolError(f"{url} answered HTTP {resp.status} {resp.reason or ''}".rstrip())
        kind = CONTENT_KINDS.get(resp.content_type)
        if kind is None:
            raise ToolError(
                f"{url} is {resp.content_type}, which web_fetch does not read (it reads "
                "HTML, plain text, JSON and PDF)"
            )
        body, truncated = await _read_capped(resp, self.config.max_bytes)
        charset = resp.charset
        return await asyncio.to_thread(
            _to_page, str(url), resp.content_type, kind, body, charset, truncated
        )


def _redirect(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location))
    except (ValueError, TypeError) as exc:
        raise ToolError(f"{base} redirected to an invalid URL {location!r}") from exc


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(READ_CHUNK):
        room = max_bytes - total
        if len(chunk) > room:
            parts.append(chunk[:room])
            return b"".join(parts), True
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts), False


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _to_page(
    url: str, content_type: str, kind: str, body: bytes, charset: str | None, truncated: bool
) -> Page:
    title: str | None = None
    if kind == "html":
        extracted = html_to_text(_decode(body, charset) if charset else body)
        title, text = extracted.title, extracted.text
    elif kind == "pdf":
        if truncated:
            raise ToolError(
                f"{url} is a PDF larger than the fetch limit of {len(body)} bytes; a cut PDF "
                "cannot be read"
            )
        try:
            extracted = pdf_to_text(body)
        except ExtractionError as exc:
            raise ToolError(f"{url}: {exc}") from exc
        title, text = extracted.title, extracted.text
    else:
        text = _decode(body, charset)
    return Page(url=url, title=title, text=text, content_type=content_type, truncated=truncated)


def page_output(page: Page, max_bytes: int) -> ToolOutput:
    lines = [f"URL: {page.url}"]
    if page.title:
        lines.append(f"Title: {page.title}")
    if page.truncated:
        lines.append(f"[the page was longer than {max_bytes} bytes and was cut there]")
    text = page.text.strip() or "(the page has no readable text)"
    snippet = " ".join(page.text.split())[:SNIPPET_CHARS]
    source = Source(title=page.title or page.url, url=page.url, snippet=snippet, source="web_fetch")
    return ToolOutput(text="\n".join(lines) + "\n\n" + text, sources=(source,), cost=0.0)


PageURL = Annotated[
    str, Field(min_length=1, max_length=4096, description="The http(s) URL of the page to read.")
]


def web_fetch_tool(fetcher: Fetcher) -> Tool:
    async def web_fetch(url: PageURL) -> ToolOutput:
        """Read a web page (HTML, plain text, JSON or PDF) and return its main text. Use it to
        check a search result in full; cite the page by its URL."""
        page = await fetcher.fetch(url)
        return page_output(page, fetcher.config.max_bytes)

    return Tool.from_function(web_fetch, price=0.0)
