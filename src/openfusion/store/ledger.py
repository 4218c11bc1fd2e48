"""The spend ledger: what every inner call cost, per API key, and the keys' budgets.

Money is stored as integer nano-USD (``round(usd * 1e9)``), so sums are exact: the ledger's
total is the sum of its rows, whatever order they were added in. Three tables::

    budgets       key_id PK, limit_nano                      one row per key that has a budget
    reservations  id PK, key_id, amount_nano, created_at     money held by requests in flight
    spend         id PK, key_id (NULL: no key), generation_id, stage, model,
                  cost_nano (NULL: unknown), unpriced, created_at

A request on a key with a budget first ``reserve``s what it may spend, runs with that as its
``max_cost``, then ``settle``s: one transaction swaps the reservation for the calls' real cost.
``reserve`` is an atomic check-and-insert, so concurrent requests — in one process, or in many
sharing the database — never hold more than the budget between them:

- SQLite: every writing transaction starts with ``BEGIN IMMEDIATE``, which takes the database's
  write lock before the check reads anything; a second writer waits (``timeout``) for it.
- PostgreSQL: ``SELECT ... FOR UPDATE`` on the key's ``budgets`` row serialises reservations on
  that key; spent and reserved are then summed in one statement (one snapshot).

A reservation older than ``reservation_ttl`` seconds was left by a server that died before it
settled; it no longer counts. A request whose calls cost more than it reserved (an upstream
that ignored ``max_tokens``) is charged its real cost; the excess is added to the key's
``api_keys.overshoot_nano``, so the operator sees what went past the budget's reach. The
tables live in ``store/schema.py``, the database (and its migrations) in ``store/database.py``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from openfusion.errors import OpenFusionError
from openfusion.store.database import Database
from openfusion.store.schema import api_keys, budgets, reservations, spend

__all__ = [
    "NANO",
    "BudgetExhausted",
    "BudgetStatus",
    "Reservation",
    "SpendLedger",
    "SpendRecord",
    "SpendRow",
    "charge_of",
    "format_usd",
    "to_nano",
]

NANO = 1_000_000_000
"""nano-USD per USD."""
DEFAULT_RESERVATION_TTL = 15 * 60.0
UNPRICED_RESERVE = "unpriced_reserve"
"""The stage of the row that charges a budget for calls of unknown cost (see ``settle``)."""


def to_nano(usd: float) -> int:
    """USD as integer nano-USD; refuses what is not a finite amount."""
    if not math.isfinite(usd):
        raise ValueError(f"not an amount of money: {usd!r}")
    return round(usd * NANO)


def charge_of(rows: Sequence[SpendRow], held_nano: int | None) -> int:
    """What ``settle`` charges a key for ``rows`` against a reservation of ``held_nano``:
    the priced rows, and when a row has no price, the rest of the reservation too."""
    priced = sum(to_nano(row.cost) for row in rows if row.cost is not None)
    if held_nano is not None and any(row.cost is None for row in rows):
        return max(priced, held_nano)
    return priced


def format_usd(nano: int) -> str:
    """Exact, without float noise: ``$1.00``, ``$0.0069``, ``-$0.000000001``."""
    whole, fraction = divmod(abs(nano), NANO)
    digits = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{'-' if nano < 0 else ''}${whole}.{digits}"


class BudgetExhausted(OpenFusionError):
    """A reservation does not fit in what is left of the key's budget."""

    def __init__(
        self,
        key_id: str,
        *,
        limit_nano: int,
        spent_nano: int,
        reserved_nano: int,
        wanted_nano: int,
        overshoot_nano: int = 0,
    ) -> None:
        self.key_id = key_id
        self.limit_nano = limit_nano
        self.spent_nano = spent_nano
        self.reserved_nano = reserved_nano
        self.wanted_nano = wanted_nano
        self.overshoot_nano = overshoot_nano
        held = f" and {format_usd(reserved_nano)} is held by requests in flight" * bool(
            reserved_nano
        )
        over = (
            f" ({format_usd(overshoot_nano)} of it beyond what its requests reserved: an "
            "upstream billed more than the max_tokens it was sent)"
        ) * bool(overshoot_nano)
        super().__init__(
            f"budget exhausted: API key {key_id} has spent {format_usd(spent_nano)} of its "
            f"{format_usd(limit_nano)} budget{over}{held}; this request needs "
            f"{format_usd(wanted_nano)}. The server's operator can raise the budget with "
            f"`openfusion keys budget {key_id} USD`"
        )

    @property
    def limit(self) -> float:
        return self.limit_nano / NANO

    @property
    def spent(self) -> float:
        return self.spent_nano / NANO

    @property
    def overshoot(self) -> float:
        return self.overshoot_nano / NANO


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    key_id: str
    amount_nano: int

    @property
    def amount(self) -> float:
        """USD: what the request may spend (its ``max_cost``)."""
        return self.amount_nano / NANO


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    key_id: str
    limit_nano: int | None
    """``None``: the key has no budget."""
    spent_nano: int
    reserved_nano: int
    """Held by live reservations (stale ones not counted)."""
    overshoot_nano: int = 0
    """Of ``spent_nano``, what requests cost beyond what they had reserved."""

    @property
    def remaining_nano(self) -> int | None:
        if self.limit_nano is None:
            return None
        return self.limit_nano - self.spent_nano - self.reserved_nano


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One inner call (or one stage) to record: ``cost`` in USD, ``None`` when unknown."""

    stage: str
    model: str | None
    cost: float | None


@dataclass(frozen=True, slots=True)
class SpendRecord:
    """A row of the ``spend`` table as read back."""

    key_id: str | None
    generation_id: str
    stage: str
    model: str | None
    cost_nano: int | None
    unpriced: bool
    created_at: datetime


class SpendLedger:
    """Spend and budgets in the store's database.

    ``database`` is a ``Database`` (shared with the rest of the store; the caller closes it) or
    a URL (the ledger opens its own and closes it in ``aclose``). ``init()`` brings the schema
    to head (and is also run by the first call that needs it). ``clock`` (epoch seconds) is for
    tests of the reservations' time to live; ``schema`` (PostgreSQL only, with a URL) puts the
    tables in that schema.
    """

    def __init__(
        self,
        database: Database | str,
        *,
        reservation_ttl: float = DEFAULT_RESERVATION_TTL,
        clock: Callable[[], float] = time.time,
        schema: str | None = None,
    ) -> None:
        self._owns_database = isinstance(database, str)
        self.db = Database(database, schema=schema) if isinstance(database, str) else database
        self.where = self.db.where
        """The URL without its password, for messages."""
        self.reservation_ttl = reservation_ttl
        self._clock = clock

    # -- lifecycle -------------------------------------------------------------------------

    async def init(self) -> None:
        await self.db.init()

    async def aclose(self) -> None:
        if self._owns_database:
            await self.db.aclose()

    async def __aenter__(self) -> SpendLedger:
        await self.init()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # -- budgets ---------------------------------------------------------------------------

    async def set_budget(self, key_id: str, usd: float | None) -> None:
        """Give ``key_id`` a budget of ``usd`` (what it has spent already counts), or remove
        its budget with ``None``."""
        if usd is not None and not (math.isfinite(usd) and usd >= 0):
            raise ValueError(f"a budget is a non-negative amount of USD, not {usd!r}")
        async with self._write() as conn:
            await conn.execute(delete(budgets).where(budgets.c.key_id == key_id))
            if usd is not None:
                await conn.execute(insert(budgets).values(key_id=key_id, limit_nano=to_nano(usd)))

    async def budget(self, key_id: str) -> BudgetStatus:
        async with self._read() as conn:
            limit = await self._limit(conn, key_id)
            spent, reserved = await self._totals(conn, key_id)
            overshoot = await self._overshoot(conn, key_id)
        return BudgetStatus(key_id, limit, spent, reserved, overshoot)

    async def overshoot(self, key_id: str) -> int:
        """What ``key_id``'s requests cost beyond what they reserved, in nano-USD."""
        async with self._read() as conn:
            return await self._overshoot(conn, key_id)

    async def spent(self, key_id: str | None) -> int:
        """What ``key_id`` has spent (``None``: requests without a key), in nano-USD."""
        async with self._read() as conn:
            total = await conn.scalar(
                select(func.coalesce(func.sum(spend.c.cost_nano), 0)).where(_key_is(key_id))
            )
        return int(total or 0)

    async def rows(self, generation_id: str) -> list[SpendRecord]:
        """The spend rows of one generation, in the order they were written."""
        async with self._read() as conn:
            result = await conn.execute(
                select(spend).where(spend.c.generation_id == generation_id).order_by(spend.c.id)
            )
            return [
                SpendRecord(
                    r.key_id,
                    r.generation_id,
                    r.stage,
                    r.model,
                    r.cost_nano,
                    r.unpriced,
                    r.created_at,
                )
                for r in result
            ]

    # -- reserve and settle ----------------------------------------------------------------

    async def reserve(
        self, key_id: str, amount_usd: float, *, up_to: bool = False
    ) -> Reservation | None:
        """Hold ``amount_usd`` of ``key_id``'s budget for a request; ``None`` if the key has no
        budget (nothing to hold).

        Atomic: the check (limit - spent - live reservations >= amount) and the insert happen in
        one transaction that holds the key's lock. Raises ``BudgetExhausted`` when the amount
        does not fit; with ``up_to``, holds what is left when that is less (but more than 0).
        """
        wanted = to_nano(amount_usd)
        if wanted < 0:
            raise ValueError(f"cannot reserve a negative amount: {amount_usd!r}")
        async with self._read() as conn:  # most keys have no budget: no write lock for them
            if await self._limit(conn, key_id) is None:
                return None
        async with self._write() as conn:
            limit = await self._limit(conn, key_id, lock=True)
            if limit is None:
                return None
            spent, reserved = await self._totals(conn, key_id)
            remaining = limit - spent - reserved
            amount = min(wanted, remaining) if up_to else wanted
            if remaining <= 0 or amount > remaining:
                raise BudgetExhausted(
                    key_id,
                    limit_nano=limit,
                    spent_nano=spent,
                    reserved_nano=reserved,
                    wanted_nano=wanted,
                    overshoot_nano=await self._overshoot(conn, key_id),
                )
            return await self._insert_reservation(conn, key_id, amount)

    async def hold(self, key_id: str, amount_nano: int) -> Reservation:
        """Record a reservation without checking the budget: for a caller that checked it
        elsewhere, atomically (``openfusion.cluster.HotBudgets``, in Redis). A plain insert,
        no lock: the row makes the hold count for every reader of the database."""
        async with self._write() as conn:
            return await self._insert_reservation(conn, key_id, amount_nano)

    async def _insert_reservation(
        self, conn: AsyncConnection, key_id: str, amount_nano: int
    ) -> Reservation:
        reservation = Reservation(uuid.uuid4().hex, key_id, amount_nano)
        await conn.execute(
            insert(reservations).values(
                id=reservation.id,
                key_id=key_id,
                amount_nano=amount_nano,
                created_at=self._now(),
            )
        )
        return reservation

    async def resize(self, reservation_id: str, amount_nano: int) -> None:
        """Lower a ``hold`` to what was granted (0 drops it)."""
        async with self._write() as conn:
            if amount_nano <= 0:
                await conn.execute(delete(reservations).where(reservations.c.id == reservation_id))
            else:
                await conn.execute(
                    update(reservations)
                    .where(reservations.c.id == reservation_id)
                    .values(amount_nano=amount_nano)
                )

    async def settle(
        self,
        reservation_id: str | None,
        generation_id: str,
        rows: Sequence[SpendRow],
        *,
        key_id: str | None = None,
    ) -> None:
        """In one transaction: drop the reservation and record ``rows`` (one per call).

        The rows belong to the reservation's key; without a reservation (a key without budget,
        or no key) to ``key_id``. A row whose cost is unknown (``None``) is kept with
        ``unpriced`` set and no cost; if the reservation covered it, the budget is charged
        conservatively: the part of the reservation not spent by the priced rows goes on an
        extra row of stage ``unpriced_reserve``, so calls of unknown cost can never take a key
        past its budget (they cost at most the reservation, which was the request's
        ``max_cost``). Priced rows that add up to more than the reservation (an upstream that
        billed past ``max_tokens``) are recorded as they are, and the excess is added to the
        key's overshoot. Settle each reservation once: a second call records the rows again.
        """
        async with self._write() as conn:
            await self.settle_in(conn, reservation_id, generation_id, rows, key_id=key_id)

    async def settle_in(
        self,
        conn: AsyncConnection,
        reservation_id: str | None,
        generation_id: str,
        rows: Sequence[SpendRow],
        *,
        key_id: str | None = None,
    ) -> None:
        """``settle`` inside a writing transaction of the caller's (to record a run and its
        spend together)."""
        values: list[dict[str, Any]] = []
        now = self._now()
        held: int | None = None
        if reservation_id is not None:
            found = (
                await conn.execute(
                    select(reservations.c.key_id, reservations.c.amount_nano).where(
                        reservations.c.id == reservation_id
                    )
                )
            ).one_or_none()
            if found is not None:
                key_id, held = found.key_id, found.amount_nano
                await conn.execute(delete(reservations).where(reservations.c.id == reservation_id))
        for row in rows:
            values.append(
                _spend_values(key_id, generation_id, row.stage, row.model, _nano(row.cost), now)
            )
        priced = sum(v["cost_nano"] for v in values if v["cost_nano"] is not None)
        if held is not None and priced > held:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(overshoot_nano=api_keys.c.overshoot_nano + (priced - held))
            )
        if held is not None and any(row.cost is None for row in rows):
            values.append(
                _spend_values(
                    key_id, generation_id, UNPRICED_RESERVE, None, max(held - priced, 0), now
                )
            )
        if values:
            await self.db.insert_many(conn, spend, values)

    async def record_in(
        self, conn: AsyncConnection, runs: Sequence[tuple[str | None, str, Sequence[SpendRow]]]
    ) -> None:
        """The spend of several runs that held no reservation — ``(key_id, generation_id,
        rows)`` each — in one statement, inside the caller's writing transaction (``settle_in``
        for each would be one statement per run)."""
        now = self._now()
        values = [
            _spend_values(key_id, generation_id, row.stage, row.model, _nano(row.cost), now)
            for key_id, generation_id, rows in runs
            for row in rows
        ]
        if values:
            await self.db.insert_many(conn, spend, values)

    # -- internals -------------------------------------------------------------------------

    def _now(self, offset: float = 0.0) -> datetime:
        """Naive UTC (one form for SQLite and PostgreSQL's ``timestamp``), ``offset`` seconds
        from the clock's now."""
        return datetime.fromtimestamp(self._clock() + offset, UTC).replace(tzinfo=None)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.db.read() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self.db.write() as conn:
            yield conn

    @staticmethod
    async def _limit(conn: AsyncConnection, key_id: str, *, lock: bool = False) -> int | None:
        query = select(budgets.c.limit_nano).where(budgets.c.key_id == key_id)
        if lock:
            query = query.with_for_update()
        value = await conn.scalar(query)
        return None if value is None else int(value)

    @staticmethod
    async def _overshoot(conn: AsyncConnection, key_id: str) -> int:
        value = await conn.scalar(select(api_keys.c.overshoot_nano).where(api_keys.c.id == key_id))
        return int(value or 0)

    async def _totals(self, conn: AsyncConnection, key_id: str) -> tuple[int, int]:
        """Spent and live-reserved nano-USD of ``key_id``, read in one statement (one snapshot:
        a settle committing meanwhile is seen entirely or not at all)."""
        since = self._now(-self.reservation_ttl)
        spent = (
            select(func.coalesce(func.sum(spend.c.cost_nano), 0))
            .where(spend.c.key_id == key_id)
            .scalar_subquery()
        )
        reserved = (
            select(func.coalesce(func.sum(reservations.c.amount_nano), 0))
            .where(reservations.c.key_id == key_id, reservations.c.created_at > since)
            .scalar_subquery()
        )
        row = (await conn.execute(select(spent, reserved))).one()
        return int(row[0]), int(row[1])


def _nano(cost: float | None) -> int | None:
    return None if cost is None else to_nano(cost)


def _key_is(key_id: str | None) -> Any:
    return spend.c.key_id.is_(None) if key_id is None else spend.c.key_id == key_id


def _spend_values(
    key_id: str | None,
    generation_id: str,
    stage: str,
    model: str | None,
    cost_nano: int | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "key_id": key_id,
        "generation_id": generation_id,
        "stage": stage,
        "model": model,
        "cost_nano": cost_nano,
        "unpriced": cost_nano is None,
        "created_at": now,
    }
