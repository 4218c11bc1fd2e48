"""Server API keys in the store's database: every replica sees the same keys.

A key is ``ofk-`` plus 32 random bytes (``secrets.token_urlsafe``): with that much entropy nobody
can guess a key from its hash, so a fast hash (sha256) is enough; a slow password hash (bcrypt,
argon2) would only cost time on every request. The plaintext key is returned once by ``create``
and never stored; a request's key is looked up by its hash. An *admin* key may read every run
through the runs API; any other key reads only its own runs.

Keys created, revoked or given the admin flag with ``openfusion keys`` take effect on running
servers from their next request. Before this store, keys lived in ``<config dir>/api_keys.json``:
``import_file`` moves them into the database once, and renames the file to
``api_keys.json.imported`` so that it is not read again.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import insert, select, update
from sqlalchemy.engine import RowMapping

from openfusion.errors import ConfigError
from openfusion.settings import describe_validation_error
from openfusion.store.database import Database
from openfusion.store.schema import api_keys

__all__ = ["KEYS_FILE", "KeyRecord", "KeyStore", "hash_key"]

log = logging.getLogger(__name__)

KEYS_FILE = "api_keys.json"
IMPORTED_SUFFIX = ".imported"
KEY_PREFIX = "ofk-"
CREATE_HINT = "`openfusion keys create NAME`"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One server API key as stored: never the key itself, only its sha256."""

    id: str
    name: str
    hash: str = field(repr=False)
    created: str
    """When the key was made, ISO 8601 in UTC."""
    revoked: bool = False
    admin: bool = False
    rpm: int | None = None
    """Requests per minute this key may send (``None``: no limit)."""
    tpm: int | None = None
    """Tokens per minute its runs may use, all inner calls counted (``None``: no limit)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The ``api_keys`` table: create, verify, list, find, revoke."""

    def __init__(self, database: Database) -> None:
        self.db = database

    async def create(
        self,
        name: str,
        *,
        admin: bool = False,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """Make a key called ``name``; returns its record and the plaintext key (shown once)."""
        _check_limits(rpm, tpm)
        name = name.strip()
        if not name or not name.isprintable() or len(name) > 100:
            raise ConfigError(
                f"bad key name {name!r}: use 1 to 100 printable characters, e.g. `laptop` or `ci`"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = _now()
        async with self.db.write() as conn:
            taken = await conn.scalar(
                select(api_keys.c.id).where(api_keys.c.name == name, ~api_keys.c.revoked)
            )
            if taken is not None:
                raise ConfigError(
                    f"an active key named {name!r} exists already: choose another name, "
                    f"or revoke the old one first with `openfusion keys revoke {name}`"
                )
            ids = set((await conn.scalars(select(api_keys.c.id))).all())
            key_id = secrets.token_hex(4)
            while key_id in ids:
                key_id = secrets.token_hex(4)
            record = KeyRecord(
                key_id, name, hash_key(key), _iso(now), admin=admin, rpm=rpm, tpm=tpm
            )
            await conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    name=name,
                    hash=record.hash,
                    admin=admin,
                    revoked=False,
                    created_at=now,
                    rpm=rpm,
                    tpm=tpm,
                )
            )
        return record, key

    async def verify(self, token: str) -> KeyRecord | None:
        """The active key whose hash matches ``token``, or None (unknown or revoked)."""
        if not token:
            return None
        async with self.db.read() as conn:
            row = (
                (await conn.execute(select(api_keys).where(api_keys.c.hash == hash_key(token))))
                .mappings()
                .one_or_none()
            )
        return None if row is None or row["revoked"] else key_record(row)

    async def list(self) -> builtins.list[KeyRecord]:
        """Every key, revoked ones too, oldest first."""
        async with self.db.read() as conn:
            rows = await conn.execute(select(api_keys).order_by(api_keys.c.created_at))
            return [key_record(row) for row in rows.mappings()]

    async def find(self, id_or_name: str) -> KeyRecord | None:
        """The key with this id, else the active key with this name."""
        records = await self.list()
        return next((r for r in records if r.id == id_or_name), None) or next(
            (r for r in records if r.name == id_or_name and not r.revoked), None
        )

    async def revoke(self, id_or_name: str) -> KeyRecord:
        """Revoke a key by id, or the active key with that name. Revoking twice is harmless."""
        match = await self._find_or_fail(id_or_name)
        if match.revoked:
            return match
        async with self.db.write() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == match.id)
                .values(revoked=True, revoked_at=_now())
            )
        return dataclasses.replace(match, revoked=True)

    async def set_admin(self, id_or_name: str, admin: bool) -> KeyRecord:
        match = await self._find_or_fail(id_or_name)
        async with self.db.write() as conn:
            await conn.execute(
                update(api_keys).where(api_keys.c.id == match.id).values(admin=admin)
            )
        return dataclasses.replace(match, admin=admin)

    async def set_limits(self, id_or_name: str, rpm: int | None, tpm: int | None) -> KeyRecord:
        """Set the key's requests and tokens per minute (``None``: no limit); running servers
        apply them from the key's next request."""
        _check_limits(rpm, tpm)
        match = await self._find_or_fail(id_or_name)
        async with self.db.write() as conn:
            await conn.execute(
                update(api_keys).where(api_keys.c.id == match.id).values(rpm=rpm, tpm=tpm)
            )
        return dataclasses.replace(match, rpm=rpm, tpm=tpm)

    async def has_active_keys(self) -> bool:
        async with self.db.read() as conn:
            found = await conn.scalar(select(api_keys.c.id).where(~api_keys.c.revoked).limit(1))
        return found is not None

    async def import_file(self, path: Path) -> int:
        """Move the keys of an ``api_keys.json`` (openfusion's first releases) into the
        database, then rename the file ``<name>.imported``. Keys already in the database (by
        id) are left as they are, so importing twice adds nothing. Returns how many it added."""
        records = await asyncio.to_thread(_read_key_file, path)
        if records is None:
            return 0  # the usual case, or another process imported and renamed it just now
        added = 0
        await self.db.init()
        async with self.db.migrating() as conn:  # one importer at a time, across processes
            known = set((await conn.scalars(select(api_keys.c.id))).all())
            for record in records:
                if record.id in known:
                    continue
                created = datetime.fromisoformat(record.created).astimezone(UTC)
                await conn.execute(
                    insert(api_keys).values(
                        id=record.id,
                        name=record.name,
                        hash=record.hash,
                        admin=False,
                        revoked=record.revoked,
                        created_at=created.replace(tzinfo=None),
                        revoked_at=None,
                    )
                )
                added += 1
        await asyncio.to_thread(_set_aside, path)
        log.info("moved %d API key(s) from %s into the database", added, path)
        return added

    async def _find_or_fail(self, id_or_name: str) -> KeyRecord:
        match = await self.find(id_or_name)
        if match is None:
            raise ConfigError(
                f"no API key with id or name {id_or_name!r} (revoked keys match by id only): "
                "`openfusion keys list` shows them"
            )
        return match


class _FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False)
    created: str
    revoked: bool = False


class _KeyFile(BaseModel):
    """``api_keys.json`` as openfusion's first releases wrote it."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    keys: builtins.list[_FileRecord] = Field(default_factory=builtins.list)


def _read_key_file(path: Path) -> builtins.list[_FileRecord] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file: {exc.strerror}") from exc
    try:
        return _KeyFile.model_validate_json(text).keys
    except ValidationError as exc:
        raise ConfigError(
            f"{path}: not a valid API key file ({describe_validation_error(exc)}); "
            f"fix it, or move it away and create new keys with {CREATE_HINT}"
        ) from exc


def _set_aside(path: Path) -> None:
    """Rename an imported key file so it is not read again (importing twice adds nothing, so
    a rename that fails only costs a second look)."""
    try:
        path.rename(path.with_name(path.name + IMPORTED_SUFFIX))
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("imported %s but could not rename it: %s", path, exc.strerror)


def key_record(row: RowMapping) -> KeyRecord:
    """A row of ``api_keys`` (or of a query that selects its columns) as a ``KeyRecord``."""
    return KeyRecord(
        row["id"],
        row["name"],
        row["hash"],
        _iso(row["created_at"]),
        row["revoked"],
        row["admin"],
        row["rpm"],
        row["tpm"],
    )


def _check_limits(rpm: int | None, tpm: int | None) -> None:
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: a limit per minute is 1 or more (or none)")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=UTC).isoformat(timespec="seconds")
