"""web_fetch refuses internal addresses in every spelling, before any socket connects, and then
connects only to the address it checked (no second lookup a rebinding DNS could answer)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from openfusion.settings import Settings
from openfusion.tools import AddressPolicy, FetchRefused, ToolSettings
from openfusion.tools.address_policy import parse_host, refusal_reason
from openfusion.tools.defaults import default_tools
from openfusion.tools.fetch import FetchConfig, Fetcher


class StubResolver:
    """DNS in a dict: each lookup of a name pops its next answer."""

    def __init__(self, answers: dict[str, list[list[str]]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        return self.answers[host].pop(0)


@pytest.fixture
async def connects(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[Any]]:
    """Every connection attempt, at the socket and at the event loop, recorded and blocked."""
    calls: list[Any] = []

    def record(name: str) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args))
            raise AssertionError(f"{name} called: a refused URL must not connect")

        return blocked

    async def async_blocked(*args: Any, **kwargs: Any) -> Any:
        return record("loop")(*args, **kwargs)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(socket.socket, "connect", record("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", record("socket.connect_ex"))
    monkeypatch.setattr(loop, "sock_connect", async_blocked)
    monkeypatch.setattr(loop, "create_connection", async_blocked)
    yield calls


DNS = {
    "internal.test": [["10.1.2.3"]],
    "mixed.test": [["93.184.216.34", "192.168.0.5"]],
    "mapped.test": [["::ffff:127.0.0.1"]],
    "linklocal6.test": [["fe80::1%2"]],
}

REFUSED = [
    ("http://2130706433/", "127.0.0.1 is a loopback address"),
    ("http://0177.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://0x7f000001/", "127.0.0.1 is a loopback address"),
    ("http://0x7f.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://127.1/", "127.0.0.1 is a loopback address"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://[::ffff:127.0.0.1]/", r"a loopback address \(127.0.0.1, inside ::ffff:7f00:1\)"),
    ("http://[::ffff:a00:1]/", r"a private address \(10.0.0.1, inside ::ffff:a00:1\)"),
    ("http://[64:ff9b::7f00:1]/", r"loopback address \(127.0.0.1, inside 64:ff9b::7f00:1\)"),
    ("http://[2002:a9fe:a9fe::]/", r"cloud metadata address \(169.254.169.254"),
    ("http://localhost./", "localhost is a name for this machine"),
    ("http://LOCALHOST/", "localhost is a name for this machine"),
    ("http://api.localhost/", "a name for this machine"),
    ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "a cloud metadata host"),
    ("http://METADATA.google.internal./", "a cloud metadata host"),
    ("http://[fd00:ec2::254]/", "a cloud metadata address"),
    ("http://168.63.129.16/", "a cloud metadata address"),
    ("http://10.0.0.1/", "a private address"),
    ("http://192.168.1.1/", "a private address"),
    ("http://172.16.0.1/", "a private address"),
    ("http://100.64.0.1/", r"a shared \(CGNAT\) address"),
    ("http://[fe80::1]/", "a link-local address"),
    ("http://[fc00::1]/", "a private address"),
    ("http://0.0.0.0/", "an unspecified address"),
    ("http://0/", "an unspecified address"),
    ("http://[::]/", "an unspecified address"),
    ("http://224.0.0.1/", "a multicast address"),
    ("http://[ff02::1]/", "a multicast address"),
    ("http://255.255.255.255/", "address"),
    ("http://240.0.0.1/", "address"),
    ("http://internal.test/", "internal.test resolves to 10.1.2.3, a private address"),
    ("http://mixed.test/", "mixed.test resolves to 192.168.0.5, a private address"),
    ("http://mapped.test/", "mapped.test resolves to ::ffff:127.0.0.1, a loopback address"),
    ("http://linklocal6.test/", "linklocal6.test resolves to fe80::1%2, a link-local address"),
    ("http://1.2.3.4.5/", "ends in a number but is not a valid IPv4 address"),
    ("http://08.0.0.1/", "ends in a number but is not a valid IPv4 address"),
    ("http://[fe80::1%25eth0]/", "IPv6 addresses with a zone are not allowed"),
    ("http://user:pass@example.com/", "user name or password"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://127.0.0.1:70/", "only http and https"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED, ids=[u for u, _ in REFUSED])
async def test_refused_before_any_connection(connects: list[Any], url: str, reason: str) -> None:
    resolver = StubResolver({k: [list(a) for a in v] for k, v in DNS.items()})
    with pytest.raises(FetchRefused, match=reason):
        await Fetcher(FetchConfig(), resolver).fetch(url)
    assert connects == []
    if "resolves to" not in reason:
        assert resolver.calls == [], "names refused by name are never looked up"


async def test_refusal_reaches_the_model_as_an_error(connects: list[Any], tmp_path: Path) -> None:
    tools = default_tools(
        Settings(config_dir=tmp_path / "c", cache_dir=tmp_path / "k"), ToolSettings(code="off")
    )
    result = await tools.call("web_fetch", '{"url": "http://0x7f.1:8080/admin"}')
    assert result.error is not None
    assert "refused to fetch" in result.error and "fetch_allow_hosts" in result.error
    assert connects == []


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal_reason(ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "parsed"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7F000001", "127.0.0.1"),
        ("3232235777", "192.168.1.1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        ("Example.COM.", "example.com"),
        ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
    ],
)
def test_host_normalisation(host: str, parsed: str) -> None:
    assert str(parse_host(host)) == parsed


def test_allow_list_opens_only_what_it_names() -> None:
    policy = AddressPolicy.from_allow_list(["127.0.0.1", "10.1.0.0/16", "intranet.test"])
    assert policy.address_refusal(ip_address("127.0.0.1")) is None
    assert policy.address_refusal(ip_address("10.1.200.3")) is None
    assert policy.address_refusal(ip_address("10.2.0.1")) == "a private address"
    assert policy.address_refusal(ip_address("127.0.0.2")) == "a loopback address"
    assert policy.address_refusal(ip_address("::ffff:127.0.0.1")) is not None
    assert policy.name_refusal("intranet.test") is None
    assert policy.name_refusal("localhost") == "a name for this machine"


async def test_denied_hosts_are_refused_before_any_lookup(connects: list[Any]) -> None:
    resolver = StubResolver({"huggingface.co": [["8.8.8.8"]], "cdn.hf.co": [["8.8.4.4"]]})
    policy = AddressPolicy.from_allow_list([], deny=["huggingface.co", "hf.co"])
    fetcher = Fetcher(FetchConfig(policy=policy), resolver)
    for url in ("https://huggingface.co/datasets/x", "https://cdn.hf.co/file", "http://HF.CO./"):
        with pytest.raises(FetchRefused, match=r"excluded from this run \(deny_hosts"):
            await fetcher.fetch(url)
    assert connects == [] and resolver.calls == []
    assert policy.name_refusal("nothf.co") is None  # a suffix, not a subdomain


@pytest.fixture
async def echo_host() -> AsyncIterator[tuple[int, list[str]]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers["Host"])
        if request.path == "/again":
            return web.Response(status=302, headers={"Location": "/"})
        return web.Response(text="host=" + request.headers["Host"])

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    yield server.port, seen
    await server.close()


async def test_connection_goes_to_the_vetted_address_with_the_name_as_host(
    echo_host: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, seen = echo_host

    def no_system_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the system resolver must not be asked")

    monkeypatch.setattr(socket, "getaddrinfo", no_system_dns)
    resolver = StubResolver({"example.test": [["127.0.0.1"]]})
    policy = AddressPolicy.from_allow_list(["127.0.0.1"])
    page = await Fetcher(FetchConfig(policy=policy), resolver).fetch(
        f"http://example.test:{port}/page"
    )
    assert page.text == f"host=example.test:{port}"
    assert seen == [f"example.test:{port}"]
    assert resolver.calls == ["example.test"]


async def test_a_rebinding_answer_is_never_asked_for(echo_host: tuple[int, list[str]]) -> None:
    port, seen = echo_host
    # First answer passes the check; a second lookup would get a private address.
    resolver = StubResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
    policy = AddressPolicy.from_allow_list(["127.0.0.1"])
    page = await Fetcher(FetchConfig(policy=policy), resolver).fetch(
        f"http://rebind.test:{port}/again"  # redirects to the same host: still one lookup
    )
    assert page.text == f"host=rebind.test:{port}"
    assert seen == [f"rebind.test:{port}"] * 2
    assert resolver.calls == ["rebind.test"]


async def test_name_resolving_to_an_unlisted_address_is_refused_even_with_an_allow_list(
    connects: list[Any],
) -> None:
    resolver = StubResolver({"sneaky.test": [["127.0.0.1", "127.0.0.53"]]})
    policy = AddressPolicy.from_allow_list(["127.0.0.1"])
    with pytest.raises(FetchRefused, match=r"127\.0\.0\.53, a loopback address"):
        await Fetcher(FetchConfig(policy=policy), resolver).fetch("http://sneaky.test/")
    assert connects == []


async def test_the_connect_guard_itself_catches_connections(connects: list[Any]) -> None:
    """The recorder above would see a connection (so an empty record means none happened)."""
    resolver = StubResolver({"public.test": [["93.184.216.34"]]})
    with pytest.raises(Exception, match="a refused URL must not connect"):
        await Fetcher(FetchConfig(), resolver).fetch("http://public.test/")
    assert connects and connects[0][0] == "loop"
