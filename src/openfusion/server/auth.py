"""Server API keys: the key store, the bearer-token middleware and the safe-bind check.

Keys live in ``<config dir>/api_keys.json`` (``KeyStore.for_settings``), managed with
``openfusion keys create|list|revoke``. ``openfusion serve`` needs::

    store = KeyStore.for_settings(settings)
    refusal = check_bind(host, store.has_active_keys(), insecure_no_auth)
    if refusal: raise click.ClickException(refusal)
    if insecure_no_auth and not is_loopback(host): print(insecure_warning(host), file=sys.stderr)
    app = BearerAuth(app, store)
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from openfusion.errors import ConfigError
from openfusion.settings import Settings, describe_validation_error

__all__ = [
    "KEYS_FILE",
    "BearerAuth",
    "KeyRecord",
    "KeyStore",
    "check_bind",
    "insecure_warning",
    "is_loopback",
]

log = logging.getLogger(__name__)

KEYS_FILE = "api_keys.json"
KEY_PREFIX = "ofk-"
CREATE_HINT = "`openfusion keys create NAME`"


class KeyRecord(BaseModel):
    """One server API key as stored: never the key itself, only its sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    created: str
    """When the key was made, ISO 8601 in UTC."""
    revoked: bool = False


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    keys: list[KeyRecord] = Field(default_factory=list)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """Server API keys in a JSON file, hashed.

    A key is ``ofk-`` plus 32 random bytes (``secrets.token_urlsafe``): with that much entropy
    nobody can guess a key from its hash, so a fast hash (sha256) is enough; a slow password hash
    (bcrypt, argon2) would only cost time on every request. The plaintext key is returned once by
    ``create`` and never stored.

    Writes are atomic (a temp file in the same dir, then ``os.replace``; mode 0600). Every read
    first checks the file's stat and reloads when it changed, so keys created or revoked with
    ``openfusion keys`` take effect on a running server without a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: builtins.list[KeyRecord] = []
        self._stamp: tuple[int, int, int] | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> KeyStore:
        return cls(settings.config_dir / KEYS_FILE)

    def create(self, name: str) -> tuple[KeyRecord, str]:
        """Make a key called ``name``; returns its record and the plaintext key (shown once)."""
        name = name.strip()
        if not name or not name.isprintable() or len(name) > 100:
            raise ConfigError(
                f"bad key name {name!r}: use 1 to 100 printable characters, e.g. `laptop` or `ci`"
            )
        records = self._load()
        if any(r.name == name and not r.revoked for r in records):
            raise ConfigError(
                f"an active key named {name!r} exists already: choose another name, "
                f"or revoke the old one first with `openfusion keys revoke {name}`"
            )
        ids = {r.id for r in records}
        key_id = secrets.token_hex(4)
        while key_id in ids:
            key_id = secrets.token_hex(4)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        record = KeyRecord(id=key_id, name=name, hash=_hash(key), created=created)
        self._write([*records, record])
        return record, key

    def verify(self, token: str) -> KeyRecord | None:
        """The active key whose hash matches ``token``, or None (unknown or revoked)."""
        if not token:
            return None
        digest = _hash(token)
        found = None
        for record in self._load():
            if hmac.compare_digest(digest, record.hash):
                found = record
        return found if found is not None and not found.revoked else None

    def list(self) -> builtins.list[KeyRecord]:
        return builtins.list(self._load())

    def find(self, id_or_name: str) -> KeyRecord | None:
        """The key with this id, else the active key with this name."""
        records = self._load()
        return next((r for r in records if r.id == id_or_name), None) or next(
            (r for r in records if r.name == id_or_name and not r.revoked), None
        )

    def revoke(self, id_or_name: str) -> KeyRecord:
        """Revoke a key by id, or the active key with that name. Revoking twice is harmless."""
        records = self._load()
        match = self.find(id_or_name)
        if match is None:
            raise ConfigError(
                f"no API key with id or name {id_or_name!r} (revoked keys match by id only): "
                "`openfusion keys list` shows them"
            )
        if match.revoked:
            return match
        revoked = match.model_copy(update={"revoked": True})
        self._write([revoked if r is match else r for r in records])
        return revoked

    def has_active_keys(self) -> bool:
        return any(not r.revoked for r in self._load())

    def _load(self) -> builtins.list[KeyRecord]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._records, self._stamp = [], None
            return self._records
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self._records
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the API key file: {exc.strerror}") from exc
        try:
            data = _KeyFile.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(
                f"{self.path}: not a valid API key file ({describe_validation_error(exc)}); "
                f"fix it, or move it away and create new keys with {CREATE_HINT}"
            ) from exc
        self._records, self._stamp = data.keys, stamp
        return self._records

    def _write(self, records: builtins.list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = _KeyFile(keys=records).model_dump_json(indent=2) + "\n"
        # mkstemp creates the file with mode 0600: only its owner can read the hashes.
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._records = records
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)


class BearerAuth:
    """ASGI middleware: requests need ``Authorization: Bearer <key>`` with an active key.

    Open without a store, or while the store has never had an active key (a local server with no
    keys). Once it has seen an active key it stays closed, even if every key is later revoked or
    the file deleted: that locks clients out instead of opening the server to anyone. Every path
    needs a key except ``open_paths`` (``/health``). The matched ``KeyRecord`` goes to
    ``scope["state"]["api_key"]`` (``request.state.api_key`` in Starlette).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: KeyStore | None,
        *,
        open_paths: Collection[str] = ("/health",),
    ) -> None:
        self.app = app
        self.store = store
        self.open_paths = frozenset(open_paths)
        self._enforcing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.store is None
            or scope["type"] not in ("http", "websocket")
            or scope["path"] in self.open_paths
        ):
            await self.app(scope, receive, send)
            return
        try:
            if not self._enforcing and self.store.has_active_keys():
                self._enforcing = True
            token = _bearer_token(scope)
            record = self.store.verify(token) if self._enforcing and token else None
        except ConfigError as exc:
            log.error("refusing request: %s", exc)
            message = "the server cannot read its API key file; its log says why"
            await _reject(scope, send, 500, message)
            return
        if not self._enforcing:
            await self.app(scope, receive, send)
            return
        if record is None:
            if token is None:
                message = (
                    "missing API key: send the header `Authorization: Bearer <key>`; "
                    f"the server's operator makes keys with {CREATE_HINT}"
                )
            else:
                message = (
                    "invalid or revoked API key: send `Authorization: Bearer <key>` with an "
                    "active key (`openfusion keys list` on the server shows them)"
                )
            await _reject(scope, send, 401, message)
            return
        scope.setdefault("state", {})["api_key"] = record
        await self.app(scope, receive, send)


def _bearer_token(scope: Scope) -> str | None:
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


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (no name is resolved)."""
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
