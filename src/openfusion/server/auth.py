"""Server API keys at the door: the bearer-token middleware and the safe-bind check.

The keys themselves live in the store (``openfusion.store.KeyStore``), managed with
``openfusion keys create|list|revoke|admin``. ``openfusion serve`` needs::

    refusal = check_bind(host, await store.keys.has_active_keys(), insecure_no_auth)
    if refusal: raise click.ClickException(refusal)
    if insecure_no_auth and not is_loopback(host): print(insecure_warning(host), file=sys.stderr)
    app = BearerAuth(app, store.keys)
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from openfusion.errors import ConfigError, StoreError
from openfusion.store import KeyRecord, KeyStore
from openfusion.store.keys import CREATE_HINT

__all__ = [
    "BearerAuth",
    "KeyGate",
    "bearer_token",
    "check_bind",
    "insecure_warning",
    "is_loopback",
    "refusal",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


class KeyGate:
    """Whether this server asks for API keys, and which key a token is: one rule for the API
    (``BearerAuth``) and the trace viewer (``openfusion.server.ui``).

    Open without a store, or while the store has never had an active key (a local server with
    no keys). Once it has seen an active key it stays closed, even if every key is later
    revoked: that locks clients out instead of opening the server to anyone. Both methods
    raise ``ConfigError`` or ``StoreError`` when the keys cannot be read.

    A read is reused for ``ttl`` seconds (``[server] key_cache_seconds``): a database read per
    request was 2 of a pass-through request's 3.4 ms of added latency (measured at c=1).
    Whether there are keys, and active keys, are kept; an unknown or revoked token is read
    every time. A key created, revoked or changed elsewhere counts within ``ttl``.
    """

    def __init__(self, store: KeyStore | None, *, ttl: float = 0.0) -> None:
        self.store = store
        self.ttl = ttl
        self._enforcing = False
        self._reads: dict[object, asyncio.Future[Any]] = {}
        self._kept: dict[object, tuple[float, Any]] = {}
        """What -> (when its read started, its answer); bounded by the active keys."""

    async def enforcing(self) -> bool:
        store = self.store
        if store is None:
            return False
        if not self._enforcing and await self._shared("any", store.has_active_keys, keep=True):
            self._enforcing = True
        return self._enforcing

    async def verify(self, token: str) -> KeyRecord | None:
        store = self.store
        if store is None:
            return None
        return await self._shared(("key", token), lambda: store.verify(token))

    async def _shared(
        self, what: object, read: Callable[[], Awaitable[T]], *, keep: bool = False
    ) -> T:
        """``read()``'s answer of less than ``ttl`` seconds ago, or the same read in flight, or
        a new one: requests that arrive together share one query (2,000 requests at once no
        longer queue 2,000 reads for the database's pool). An answer of ``None`` is kept only
        with ``keep``."""
        kept = self._kept.get(what)
        if kept is not None and time.monotonic() - kept[0] < self.ttl:
            result: T = kept[1]
            return result
        flight = self._reads.get(what)
        if flight is None:
            flight = self._reads[what] = asyncio.ensure_future(read())
            started = time.monotonic()
            flight.add_done_callback(lambda done: self._landed(what, done, started, keep))
        result = await asyncio.shield(flight)  # one request gone does not cancel the read
        return result

    def _landed(
        self, what: object, flight: asyncio.Future[Any], started: float, keep: bool
    ) -> None:
        self._reads.pop(what, None)
        if flight.cancelled() or flight.exception() is not None:  # retrieved: all may have gone
            return
        if self.ttl and (keep or flight.result() is not None):
            self._kept[what] = (started, flight.result())
        else:
            self._kept.pop(what, None)


class BearerAuth:
    """ASGI middleware: requests need ``Authorization: Bearer <key>`` with an active key
    while the ``KeyGate`` is closed.

    Every path needs a key except ``open_paths`` (``/health``). The matched ``KeyRecord`` goes to
    ``scope["state"]["api_key"]`` (``request.state.api_key`` in Starlette). A database that
    cannot be read gives 503 (and the log says why), never an open door.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore | KeyGate | None,
        *,
        open_paths: Collection[str] = ("/health",),
    ) -> None:
        self.app = app
        self.gate = keys if isinstance(keys, KeyGate) else KeyGate(keys)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        try:
            enforcing = await self.gate.enforcing()
            token = bearer_token(scope)
            record = await self.gate.verify(token) if enforcing and token else None
        except (ConfigError, StoreError) as exc:
            log.error("refusing request: %s", exc)
            message = "the server cannot read its API keys now; its log says why"
            await _reject(scope, send, 503, message)
            return
        if not enforcing:
            await self.app(scope, receive, send)
            return
        if record is None:
            await _reject(scope, send, 401, refusal(token))
            return
        scope.setdefault("state", {})["api_key"] = record
        await self.app(scope, receive, send)


def refusal(token: str | None) -> str:
    """Why a request without a usable key is refused, and what to do."""
    if token is None:
        return (
            "missing API key: send the header `Authorization: Bearer <key>`; "
            f"the server's operator makes keys with {CREATE_HINT}"
        )
    return (
        "invalid or revoked API key: send `Authorization: Bearer <key>` with an "
        "active key (`openfusion keys list` on the server shows them)"
    )


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


async def _reject(scope: Scope, send: Send, status: int, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"error": {"code": status, "message": message, "metadata": {}}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (no name is resolved). Cached: the
    ``Host`` of every request of a server without API keys comes here."""
    host = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_bind(host: str, store_has_keys: bool, insecure_no_auth: bool) -> str | None:
    """None if a server may listen on ``host``; else why not and what to do instead."""
    if is_loopback(host) or store_has_keys or insecure_no_auth:
        return None
    return (
        f"refusing to listen on {host!r} without authentication: other machines can reach it "
        f"and there is no server API key. Create one with {CREATE_HINT} (clients then send "
        "`Authorization: Bearer <key>`), listen on 127.0.0.1 instead, or pass --insecure-no-auth "
        "to serve anyone who can reach this address"
    )


def insecure_warning(host: str) -> str:
    """The warning for --insecure-no-auth on a host that is not loopback."""
    return (
        f"WARNING: --insecure-no-auth: openfusion is listening on {host!r} WITHOUT "
        "AUTHENTICATION. Anyone who can reach this address can run models on your upstream API "
        f"keys and spend your credits. Create a key with {CREATE_HINT} to require one."
    )
