"""``Store``: one database and what the project keeps in it — spend, API keys, runs, and the
trace viewer's logins.

store = Store.for_settings(settings)   # database_url, else the SQLite file
await store.init()                     # migrations to head; api_keys.json moved in once
... store.ledger, store.keys, store.runs, store.sessions ...
await store.aclose()
"""

from __future__ import annotations

from pathlib import Path

from openfusion.settings import Settings
from openfusion.store.database import Database
from openfusion.store.keys import KEYS_FILE, KeyStore
from openfusion.store.ledger import DEFAULT_RESERVATION_TTL, SpendLedger
from openfusion.store.runs import RunStore
from openfusion.store.sessions import SESSION_HOURS, SessionStore

__all__ = ["Store"]


class Store:
    def __init__(
        self,
        database: Database,
        *,
        keys_file: Path | None = None,
        reservation_ttl: float = DEFAULT_RESERVATION_TTL,
        session_hours: float = SESSION_HOURS,
    ) -> None:
        self.db = database
        self.ledger = SpendLedger(database, reservation_ttl=reservation_ttl)
        self.keys = KeyStore(database)
        self.runs = RunStore(database, self.ledger)
        self.sessions = SessionStore(database, hours=session_hours)
        self._keys_file = keys_file

    @classmethod
    def for_settings(cls, settings: Settings) -> Store:
        return cls(
            Database(settings.database),
            keys_file=settings.config_dir / KEYS_FILE,
            reservation_ttl=settings.server.reservation_ttl_seconds,
            session_hours=settings.server.ui_session_hours,
        )

    async def init(self) -> None:
        """Bring the schema to head; move an ``api_keys.json`` of the first releases in."""
        await self.db.init()
        if self._keys_file is not None:
            await self.keys.import_file(self._keys_file)

    async def aclose(self) -> None:
        await self.db.aclose()

    async def __aenter__(self) -> Store:
        await self.init()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
