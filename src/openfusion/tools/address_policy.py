"""Which URLs ``web_fetch`` may open: public internet addresses only, checked before connecting.

A URL's host is first normalised the way a resolver would read it: IDNA (by yarl), lower
case, one trailing dot dropped, and any legacy IPv4 spelling (``2130706433``, ``0177.0.0.1``,
``0x7f.1``, ``127.1``) turned into its address with ``inet_aton`` semantics; a host whose last
label is a number but that is not a valid IPv4 address is refused, as a browser would. Names
for this machine (``localhost``, ``*.localhost``) and cloud metadata names are refused by name.
Any other name is resolved once, and EVERY address it resolves to must pass:

* refused: unspecified, loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7, ...),
  link-local, multicast, reserved, shared CGNAT space (100.64/10), site-local, cloud metadata
  endpoints (169.254.169.254, fd00:ec2::254, 168.63.129.16, ...), and anything else Python's
  ``ipaddress`` does not call global;
* IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible,
  6to4, NAT64 ``64:ff9b::/96``) are judged by the IPv4 address inside.

``AddressPolicy.allow`` entries (``[tools] fetch_allow_hosts``) open exact host names, or
addresses and networks, that would otherwise be refused; ``deny_names`` (``[tools]
deny_hosts``) close host names, with their subdomains, that would otherwise be allowed.
``vet`` returns the addresses it checked: the caller must connect to those and only those (no
second lookup).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from yarl import URL

from openfusion.tools.base import ToolError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Resolver(Protocol):
    """Looks a host name up: the IP addresses (text) it resolves to."""

    async def __call__(self, host: str, port: int) -> Sequence[str]: ...


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """The operating system's resolver (``getaddrinfo``), without blocking the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class FetchRefused(ToolError):
    """The URL is not one ``web_fetch`` may open (the message says why)."""


LOOPBACK_NAMES = ("localhost",)
METADATA_NAMES = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
     "instance-data.ec2.internal"}
)  # fmt: skip
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ... instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer: a public address, so named here
    )
)
_CGNAT = IPv4Network("100.64.0.0/10")
_NAT64 = IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = IPv6Network("::/96")

_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_LEGACY_IPV4 = re.compile(r"^((0x[0-9a-f]*|[0-9]+)\.){0,3}(0x[0-9a-f]*|[0-9]+)$")
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")

_KINDS: tuple[tuple[str, str], ...] = (
    ("is_unspecified", "an unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_private", "a private address"),
    ("is_reserved", "a reserved address"),
    ("is_site_local", "a site-local address"),
)


def embedded_ipv4(ip: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, 6to4, NAT64)."""
    if isinstance(ip, IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public internet address, or ``None`` when it is one."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = refusal_reason(inner)
        return f"{reason} ({inner}, inside {ip})" if reason else None
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, IPv4Address) and ip in _CGNAT:
        return "a shared (CGNAT) address"
    if isinstance(ip, IPv6Address) and ip in _NAT64_LOCAL:
        return "a local-use NAT64 address"
    for attribute, kind in _KINDS:
        if getattr(ip, attribute, False):
            return kind
    if not ip.is_global:
        return "not a public internet address"
    return None


def parse_host(raw_host: str) -> IPAddress | str:
    """A URL's host (IDNA-encoded) as an IP address, or a normalised host name.

    Raises ``FetchRefused`` for a host that is neither.
    """
    host = raw_host.lower()
    if ":" in host:
        if "%" in host:
            raise FetchRefused(f"{raw_host!r}: IPv6 addresses with a zone are not allowed")
        try:
            return IPv6Address(host.strip("[]"))
        except ValueError:
            raise FetchRefused(f"{raw_host!r} is not a valid IPv6 address") from None
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        return _legacy_ipv4(host, raw_host)
    if not _HOSTNAME.match(host):
        raise FetchRefused(f"{raw_host!r} is not a valid host name")
    return host


def _legacy_ipv4(host: str, raw_host: str) -> IPv4Address:
    """An IPv4 address in any spelling ``inet_aton`` accepts (decimal, octal, hex, short)."""
    if _LEGACY_IPV4.match(host):
        try:
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    raise FetchRefused(f"{raw_host!r} ends in a number but is not a valid IPv4 address")


def denied_host(url: str, names: Iterable[str]) -> str | None:
    """The entry of ``names`` that ``url``'s host is (or is a subdomain of), else ``None``."""
    try:
        host = (URL(url).host or "").lower().rstrip(".")
    except (ValueError, TypeError):
        return None
    return next((n for n in names if host == n or host.endswith("." + n)), None)


@dataclass(frozen=True, slots=True)
class Target:
    """A vetted URL: ``url`` to request (IPv4 host spelled canonically), and where to connect."""

    url: URL
    name: str | None
    """The host name to pin to ``addresses``; ``None`` when the host is an IP address."""
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class AddressPolicy:
    allow_networks: tuple[IPNetwork, ...] = ()
    allow_names: frozenset[str] = field(default_factory=frozenset)
    deny_names: tuple[str, ...] = ()
    """Host names refused with their subdomains, whatever they resolve to."""

    @classmethod
    def from_allow_list(cls, entries: Iterable[str], deny: Iterable[str] = ()) -> AddressPolicy:
        """Entries are host names, IP addresses or CIDR networks (``[tools] fetch_allow_hosts``);
        ``deny`` are host names (``[tools] deny_hosts``)."""
        networks: list[IPNetwork] = []
        names: set[str] = set()
        for entry in entries:
            value = entry.strip().lower().rstrip(".").strip("[]")
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                names.add(value)
        return cls(tuple(networks), frozenset(names), tuple(deny))

    def address_refusal(self, ip: IPAddress) -> str | None:
        if any(ip.version == net.version and ip in net for net in self.allow_networks):
            return None
        return refusal_reason(ip)

    def name_refusal(self, name: str) -> str | None:
        denied = next((d for d in self.deny_names if name == d or name.endswith("." + d)), None)
        if denied is not None:
            return f"excluded from this run (deny_hosts: {denied})"
        if name in self.allow_names:
            return None
        if name in LOOPBACK_NAMES or name.endswith(".localhost"):
            return "a name for this machine"
        if name in METADATA_NAMES:
            return "a cloud metadata host"
        return None

    async def vet(
        self,
        url: URL,
        resolver: Resolver,
        resolved: MutableMapping[str, tuple[str, ...]] | None = None,
    ) -> Target:
        """Check ``url`` and every address its host resolves to; raise ``FetchRefused`` if any
        is refused. ``resolved`` caches lookups, so one host is resolved once per fetch."""
        if url.scheme not in ("http", "https"):
            raise FetchRefused(f"only http and https URLs can be fetched, not {url.scheme!r}")
        if url.user is not None or url.password is not None:
            raise FetchRefused("URLs with a user name or password are not fetched")
        if not url.raw_host:
            raise FetchRefused(f"{url} has no host")
        host = parse_host(url.raw_host)
        port = url.port or (443 if url.scheme == "https" else 80)
        if not isinstance(host, str):
            reason = self.address_refusal(host)
            if reason:
                raise FetchRefused(_refused(url, f"{host} is {reason}"))
            return Target(url.with_host(str(host)), None, (str(host),))
        reason = self.name_refusal(host)
        if reason:
            raise FetchRefused(_refused(url, f"{host} is {reason}"))
        cache = {} if resolved is None else resolved
        if host not in cache:
            try:
                cache[host] = tuple(await resolver(host, port))
            except OSError as exc:
                raise ToolError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        addresses = cache[host]
        if not addresses:
            raise ToolError(f"{host} does not resolve to any address")
        if host not in self.allow_names:
            for text in addresses:
                reason = self.address_refusal(ipaddress.ip_address(text.split("%")[0]))
                if reason:
                    raise FetchRefused(_refused(url, f"{host} resolves to {text}, {reason}"))
        return Target(url, host, addresses)


def _refused(url: URL, why: str) -> str:
    return (
        f"refused to fetch {url}: {why}. web_fetch only opens public internet addresses; "
        "an operator can allow a host with fetch_allow_hosts under [tools] in config.toml"
    )
