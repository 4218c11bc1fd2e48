"""web_fetch against a real HTTP server on 127.0.0.1 (opened with fetch_allow_hosts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import make_pdf

from openfusion.tools import AddressPolicy, FetchRefused, ToolError
from openfusion.tools.fetch import FetchConfig, Fetcher, PinnedResolver, web_fetch_tool

ARTICLE = (
    "<html><head><title>Ocean tides</title></head><body><nav>Home | About | Login</nav>"
    "<article><h1>Ocean tides</h1><p>The gravitational pull of the Moon raises two tidal "
    "bulges on the oceans, so most coasts see two high tides a day.</p><p>Spring tides "
    "happen when the Sun and the Moon line up, neap tides when they are at right angles."
    "</p></article><footer>Copyright 2025</footer></body></html>"
)


@dataclass
class Site:
    url: str = ""
    hits: list[str] = field(default_factory=list)


def redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    state = Site()

    async def handle(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        path = request.path
        if path == "/article":
            return web.Response(text=ARTICLE, content_type="text/html", charset="utf-8")
        if path == "/big":
            return web.Response(text="0123456789" * 1000, content_type="text/plain")
        if path == "/json":
            return web.json_response({"answer": 42})
        if path == "/pdf":
            return web.Response(
                body=make_pdf("Fusion needs hot plasma."), content_type="application/pdf"
            )
        if path == "/binary":
            return web.Response(body=b"\x00\x01", content_type="application/octet-stream")
        if path == "/slow":
            await asyncio.sleep(5)
            return web.Response(text="late")
        if path == "/missing":
            return web.Response(status=404, text="no")
        if path == "/host":
            return web.Response(text=f"host={request.headers['Host']}")
        if path == "/to-article":
            return redirect("/article")
        if path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            return redirect(f"/chain/{n + 1}")
        targets = {
            "/to-private": "http://10.0.0.1/",
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/to-localhost": "http://localhost./",
            "/to-decimal": f"http://2130706433:{request.url.port}/article",
            "/to-ftp": "ftp://127.0.0.1/x",
        }
        if path in targets:
            return redirect(targets[path])
        return web.Response(status=500)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = str(server.make_url("")).rstrip("/")
    yield state
    await server.close()


def fetcher(**config: object) -> Fetcher:
    policy = AddressPolicy.from_allow_list(["127.0.0.1"])
    return Fetcher(FetchConfig(policy=policy, **config))  # type: ignore[arg-type]


async def test_html_becomes_readable_text(site: Site) -> None:
    page = await fetcher().fetch(site.url + "/article")
    assert page.title == "Ocean tides"
    assert "two tidal bulges" in page.text and "neap tides" in page.text
    assert "Login" not in page.text and "Copyright" not in page.text
    assert page.url == site.url + "/article" and not page.truncated


async def test_tool_output_is_fenced_with_one_source(site: Site) -> None:
    tool = web_fetch_tool(fetcher())
    output = await tool.fn(url=site.url + "/article")
    assert output.cost == 0.0
    assert output.text.startswith(f"URL: {site.url}/article\nTitle: Ocean tides\n\n")
    (source,) = output.sources
    assert (source.title, source.url, source.source) == (
        "Ocean tides",
        site.url + "/article",
        "web_fetch",
    )
    assert source.snippet.startswith("Ocean tides") or "gravitational" in source.snippet


async def test_body_is_cut_at_the_byte_cap(site: Site) -> None:
    page = await fetcher(max_bytes=1000).fetch(site.url + "/big")
    assert page.truncated and len(page.text) == 1000
    output = await web_fetch_tool(fetcher(max_bytes=1000)).fn(url=site.url + "/big")
    assert "[the page was longer than 1000 bytes and was cut there]" in output.text
    whole = await fetcher(max_bytes=10_000).fetch(site.url + "/big")
    assert not whole.truncated and len(whole.text) == 10_000


async def test_json_and_pdf_are_read(site: Site) -> None:
    assert (await fetcher().fetch(site.url + "/json")).text == '{"answer": 42}'
    pdf = await fetcher().fetch(site.url + "/pdf")
    assert "Fusion needs hot plasma." in pdf.text
    with pytest.raises(ToolError, match="a cut PDF cannot be read"):
        await fetcher(max_bytes=100).fetch(site.url + "/pdf")


async def test_slow_page_times_out(site: Site) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(ToolError, match=r"did not load within 0.5 s"):
        await fetcher(timeout=0.5).fetch(site.url + "/slow")
    assert asyncio.get_running_loop().time() - started < 3


async def test_unsupported_content_type_is_refused(site: Site) -> None:
    with pytest.raises(ToolError, match="application/octet-stream, which web_fetch does not"):
        await fetcher().fetch(site.url + "/binary")


async def test_http_error_status_is_reported(site: Site) -> None:
    with pytest.raises(ToolError, match="answered HTTP 404"):
        await fetcher().fetch(site.url + "/missing")


async def test_redirect_to_an_allowed_path_is_followed(site: Site) -> None:
    page = await fetcher().fetch(site.url + "/to-article")
    assert page.url == site.url + "/article" and "tidal bulges" in page.text
    assert site.hits == ["/to-article", "/article"]


async def test_numeric_host_forms_are_normalised_before_the_allow_list(site: Site) -> None:
    page = await fetcher().fetch(site.url + "/to-decimal")  # 2130706433 is 127.0.0.1
    assert page.url == site.url + "/article"
    with pytest.raises(FetchRefused, match=r"127\.0\.0\.1 is a loopback address"):
        await Fetcher(FetchConfig()).fetch(site.url.replace("127.0.0.1", "0x7f.1") + "/article")


async def test_too_many_redirects(site: Site) -> None:
    with pytest.raises(ToolError, match="redirected more than 5 times"):
        await fetcher().fetch(site.url + "/chain/0")
    assert site.hits == [f"/chain/{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/to-private", "10.0.0.1 is a private address"),
        ("/to-metadata", "169.254.169.254 is a cloud metadata address"),
        ("/to-localhost", "localhost is a name for this machine"),
        ("/to-ftp", "only http and https"),
    ],
)
async def test_redirect_targets_are_vetted_again(site: Site, path: str, reason: str) -> None:
    with pytest.raises(FetchRefused, match=reason):
        await fetcher().fetch(site.url + path)
    assert site.hits == [path]


async def test_pinned_resolver_refuses_unvetted_names() -> None:
    resolver = PinnedResolver()
    resolver.pins["vetted.test"] = ("127.0.0.1", "::1")
    with pytest.raises(OSError, match="not vetted"):
        await resolver.resolve("other.test", 80)
    answers = await resolver.resolve("Vetted.Test.", 8080, family=0)  # type: ignore[arg-type]
    assert [(a["host"], a["port"]) for a in answers] == [("127.0.0.1", 8080), ("::1", 8080)]
