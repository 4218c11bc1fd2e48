"""Runs in the database: the processes that write them, crash recovery, retention, and reads.

Each process that records runs has a row in ``instances`` and refreshes its ``heartbeat_at``
while it lives (``store/recorder.py`` does). A run is written as ``running`` and updated as it
goes; a process that dies leaves its runs ``running``, and ``sweep`` (run by every live process
at start and on each heartbeat) finds them: an instance is dead when its heartbeat is older than
the lease, or when it ran on this host and its process is gone. In one transaction per dead
instance, its running runs become ``unfinished`` (spans still open too), the calls they
recorded are charged to the spend ledger (server runs: they were spent) and their budget
reservations released, and the instance row is deleted. A replica restarting never touches the
runs of another live replica: that one's heartbeat is fresh and its process alive.

``prune`` deletes finished runs older than ``keep_days`` and then, while the database is
larger than ``max_mb``, the oldest ones. The spend ledger is never pruned.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, text, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from openfusion.engine.runlog import billed
from openfusion.store.database import Database
from openfusion.store.ledger import SpendLedger, SpendRow
from openfusion.store.run_views import RunFilter, detail, generation, summary
from openfusion.store.schema import instances, run_spans, runs

__all__ = ["Instance", "Pruned", "RunFilter", "RunStore", "utcnow"]

PRUNE_LOCK = 7306042
"""PostgreSQL advisory lock: one replica prunes at a time."""
PRUNE_BATCH = 500
MAX_PAGE = 200


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class Instance:
    """One process that records runs."""

    id: str
    host: str
    pid: int
    source: str

    @classmethod
    def this_process(cls, instance_id: str, source: str) -> Instance:
        return cls(instance_id, socket.gethostname(), os.getpid(), source)


@dataclass(frozen=True, slots=True)
class Pruned:
    by_age: int
    by_size: int
    size_mb: float | None
    """The database's size afterwards (SQLite: pages in use; PostgreSQL: the runs' tables)."""


class RunStore:
    def __init__(self, database: Database, ledger: SpendLedger) -> None:
        self.db = database
        self.ledger = ledger

    # -- instances -------------------------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(delete(instances).where(instances.c.id == instance.id))
            await conn.execute(
                insert(instances).values(
                    id=instance.id,
                    host=instance.host,
                    pid=instance.pid,
                    source=instance.source,
                    started_at=now,
                    heartbeat_at=now,
                )
            )

    async def heartbeat(self, instance: Instance) -> bool:
        """Refresh the instance's heartbeat; False if its row was gone (another process took
        it for dead: it is registered again)."""
        async with self.db.write() as conn:
            done = await conn.execute(
                update(instances).where(instances.c.id == instance.id).values(heartbeat_at=utcnow())
            )
        if done.rowcount:
            return True
        await self.register(instance)
        return False

    async def retire(self, instance: Instance) -> int:
        """A clean exit: the instance's runs still running become ``unfinished`` (and are
        charged as recorded), its row goes. Returns how many runs it left unfinished."""
        async with self.db.write() as conn:
            left = await self._abandon(conn, [instance.id])
            await conn.execute(delete(instances).where(instances.c.id == instance.id))
        return left

    async def sweep(self, me: Instance, *, lease: float) -> int:
        """Mark the runs of dead instances ``unfinished`` (see the module's docstring).
        Returns how many runs it marked."""
        now = utcnow()
        async with self.db.read() as conn:
            rows = (await conn.execute(select(instances))).mappings().all()
            orphans = await conn.scalars(  # one statement: one snapshot of runs and instances
                select(runs.c.instance_id)
                .where(
                    runs.c.status == "running", runs.c.instance_id.not_in(select(instances.c.id))
                )
                .distinct()
            )
            dead = [r["id"] for r in rows if r["id"] != me.id and _dead(r, me, now, lease)]
            dead += [i for i in orphans.all() if i != me.id]
        marked = 0
        for instance_id in dead:  # one transaction each: a big backlog does not hold the lock
            async with self.db.write() as conn:
                marked += await self._abandon(conn, [instance_id])
                await conn.execute(delete(instances).where(instances.c.id == instance_id))
        return marked

    async def _abandon(self, conn: AsyncConnection, instance_ids: Sequence[str]) -> int:
        found = (
            await conn.execute(
                select(runs.c.id, runs.c.source, runs.c.key_id, runs.c.reservation_id)
                .where(runs.c.instance_id.in_(instance_ids), runs.c.status == "running")
                .with_for_update()  # two replicas sweeping at once: the second finds them done
            )
        ).all()
        now = utcnow()
        for run in found:
            spans = (
                (await conn.execute(select(run_spans).where(run_spans.c.run_id == run.id)))
                .mappings()
                .all()
            )
            if run.source == "server":
                await self.ledger.settle_in(
                    conn, run.reservation_id, run.id, recorded_costs(spans), key_id=run.key_id
                )
            await conn.execute(
                update(run_spans)
                .where(
                    run_spans.c.run_id == run.id,
                    run_spans.c.status.in_(("waiting", "running")),
                )
                .values(status="unfinished")
            )
            await conn.execute(
                update(runs)
                .where(runs.c.id == run.id)
                .values(status="unfinished", updated_at=now, failure_message=ABANDONED)
            )
        return len(found)

    # -- retention -------------------------------------------------------------------------

    async def prune(
        self, *, keep_days: float, max_mb: float, now: datetime | None = None
    ) -> Pruned:
        now = now or utcnow()
        by_age = by_size = 0
        if keep_days > 0:
            cutoff = now - timedelta(days=keep_days)
            while batch := await self._oldest(PRUNE_BATCH, before=cutoff):
                deleted = await self._delete(batch)
                if not deleted:
                    break  # another replica is pruning
                by_age += deleted
        size = await self.size_mb()
        while max_mb > 0 and size is not None and size > max_mb:
            batch = await self._oldest(PRUNE_BATCH // 5)
            deleted = await self._delete(batch) if batch else 0
            if not deleted:
                break  # nothing left to prune, or another replica is at it
            by_size += deleted
            size = await self.size_mb()
        return Pruned(by_age, by_size, size)

    async def size_mb(self) -> float | None:
        async with self.db.read() as conn:
            if self.db.sqlite:
                pages = await conn.scalar(text("PRAGMA page_count"))
                free = await conn.scalar(text("PRAGMA freelist_count"))
                page = await conn.scalar(text("PRAGMA page_size"))
                return ((pages or 0) - (free or 0)) * (page or 0) / 1e6
            total = 0
            for table in (runs, run_spans):  # unqualified: found on the search path
                name = f'"{self.db.schema}".{table.name}' if self.db.schema else table.name
                size = select(func.pg_total_relation_size(func.to_regclass(name)))
                total += await conn.scalar(size) or 0
            return total / 1e6

    async def _oldest(self, limit: int, before: datetime | None = None) -> list[str]:
        query = select(runs.c.id).where(runs.c.status != "running")
        if before is not None:
            query = query.where(runs.c.created_at < before)
        async with self.db.read() as conn:
            found = await conn.scalars(query.order_by(runs.c.created_at, runs.c.id).limit(limit))
            return list(found.all())

    async def _delete(self, run_ids: list[str]) -> int:
        async with self.db.write() as conn:
            if not self.db.sqlite:  # another replica pruning now: leave it to that one
                got = await conn.scalar(text(f"SELECT pg_try_advisory_xact_lock({PRUNE_LOCK})"))
                if not got:
                    return 0
            await conn.execute(delete(run_spans).where(run_spans.c.run_id.in_(run_ids)))
            done = await conn.execute(delete(runs).where(runs.c.id.in_(run_ids)))
        return done.rowcount or 0

    # -- reads -----------------------------------------------------------------------------

    async def page(self, query: RunFilter) -> tuple[list[dict[str, Any]], str | None]:
        """A page of run summaries, newest first, and the cursor of the next page (or None)."""
        where = query.conditions()
        if query.cursor is not None:
            created, run_id = decode_cursor(query.cursor)
            where.append(
                or_(
                    runs.c.created_at < created,
                    and_(runs.c.created_at == created, runs.c.id < run_id),
                )
            )
        limit = max(1, min(query.limit, MAX_PAGE))
        statement = (
            select(runs)
            .where(*where)
            .order_by(runs.c.created_at.desc(), runs.c.id.desc())
            .limit(limit + 1)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        found = [summary(dict(row)) for row in rows[:limit]]
        more = len(rows) > limit
        return found, encode_cursor(rows[limit - 1]) if more else None

    async def get(self, run_id: str) -> dict[str, Any] | None:
        """A run with its timeline, as the runs API gives it (``run_views.detail``)."""
        row, spans = await self._run(run_id)
        return None if row is None else detail(dict(row), spans)

    async def generation(self, run_id: str) -> dict[str, Any] | None:
        """The cost breakdown ``GET /v1/generation`` gives (``run_views.generation``)."""
        row, spans = await self._run(run_id)
        return None if row is None else generation(dict(row), spans)

    async def owner(self, run_id: str) -> tuple[bool, str | None]:
        """Whether the run exists, and its key id."""
        async with self.db.read() as conn:
            found = (await conn.execute(select(runs.c.key_id).where(runs.c.id == run_id))).first()
        return (found is not None, found.key_id if found is not None else None)

    async def _run(self, run_id: str) -> tuple[RowMapping | None, list[dict[str, Any]]]:
        async with self.db.read() as conn:
            row = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().first()
            if row is None:
                return None, []
            spans = (
                await conn.execute(
                    select(run_spans).where(run_spans.c.run_id == run_id).order_by(run_spans.c.seq)
                )
            ).mappings()
            return row, [dict(span) for span in spans]


ABANDONED = "the process running it stopped before it ended (crash, kill, or shutdown)"


def recorded_costs(spans: Sequence[RowMapping]) -> list[SpendRow]:
    """The ledger rows of a run's recorded calls (finished model and tool calls)."""
    return [
        SpendRow(
            "tool" if s["kind"] == "tool" else s["stage"] or "call",
            s["model"] or s["name"],
            None if s["cost_nano"] is None else s["cost_nano"] / 1e9,
        )
        for s in spans
        if billed(s["kind"], s["status"], s["cost_nano"])
    ]


def _dead(row: RowMapping, me: Instance, now: datetime, lease: float) -> bool:
    if row["heartbeat_at"] < now - timedelta(seconds=lease):
        return True
    if row["host"] != me.host:
        return False  # another machine's process, with a fresh heartbeat: alive
    return row["pid"] == me.pid or not _process_alive(row["pid"])  # my pid: a former me


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def encode_cursor(row: RowMapping) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ``ValueError`` for a cursor this store did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, run_id = raw.partition("|")
        return datetime.fromisoformat(created), run_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cursor {cursor!r}: not a cursor this server gave") from exc
