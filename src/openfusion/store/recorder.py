"""``StoreRecorder``: writes runs to the store as they progress, off the request's path.

The engine feeds each run's ``RunLog`` (in memory, no I/O); every change marks the run dirty and
wakes a background writer, which waits ``flush_interval`` to gather more (less when a request
waits for a write), then writes every dirty run in one transaction: a new run is inserted as
``running``, a known one updated, its new or changed spans inserted or updated. A run that
started during the batch's gathering and is still running waits for the next batch (unless a
reader hurries the writer): most requests end within one, and are then written once, not
inserted and at once updated. A transaction
holds whole changes only, so a crash never leaves a half-written record: what was committed
reads as a consistent, earlier state of the run, and the next process marks it ``unfinished``
(``RunStore.sweep``).

Memory is bounded: the dirty set holds at most the runs in flight plus those waiting to be
written, and past ``max_pending`` new runs are not recorded (logged). A write that fails is
logged and retried with the next batch, ``MAX_ATTEMPTS`` times; nothing of it reaches the
answer. ``settle`` hands over a run's end with its spend-ledger rows (and the release of its
budget reservation), written in one transaction, so the ledger always equals the calls the run
recorded; it is batched like every other change (``hurry`` writes the pending batch now, for a
reader who wants a run just answered).

No secret is written: request headers are never part of a run, and every string of a row goes
through the deployment's ``Redactor`` (``openfusion.redact``): configured secrets (provider
and tool API keys from the environment), their masked forms and bearer tokens become
``[redacted]`` in whatever the upstreams relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from openfusion.engine.runlog import RunLog, Span, message_dict
from openfusion.engine.trace import RunEnd, RunStart
from openfusion.redact import Redactor
from openfusion.settings import Settings
from openfusion.store.ledger import SpendRow, to_nano
from openfusion.store.runs import Instance, utcnow
from openfusion.store.schema import run_spans, runs
from openfusion.store.store import Store

__all__ = ["LedgerEntry", "StoreRecorder"]

log = logging.getLogger(__name__)
T = TypeVar("T")

FLUSH_INTERVAL = 0.02
"""Seconds the writer gathers changes. Short, so a batch is small when the server is not busy
(each one takes the loop's thread in parts; at 0.2 s the gateway's added p99 at concurrency 1
was 2.8 ms, at 0.05 s 2.1; at 0.02 s against 0.05 s, two same-run A/Bs: 0.78 against 1.26 ms and
1.04 against 1.13, throughput unchanged); under load batches grow whatever the interval."""
HEARTBEAT = 5.0
LEASE = 60.0
"""Seconds without a heartbeat after which a process counts as dead (its runs unfinished)."""
PRUNE_EVERY = 3600.0
MAX_PENDING = 10_000
MAX_ATTEMPTS = 5
SLICE = 8
SLICES = 4
"""A batch's runs are snapshotted, and each statement's rows bound, in at most ``SLICES``
parts of at least ``SLICE``, with a turn of the event loop between parts: hundreds taken in one
go held every request for milliseconds (the gateway's p99 at concurrency 1 was 5 ms). A fixed
number of parts, not a fixed size: each turn waits behind every request ready to run, so parts
of a fixed size left the writer behind the requests under load."""
RETRY_AFTER = 1.0
CLOSE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A run's spend, recorded with its end: the reservation to release, its key."""

    reservation_id: str | None
    key_id: str | None


@dataclass
class _Tracked:
    log: RunLog
    inserted: bool = False
    span_versions: dict[int, int] = field(default_factory=dict)
    request_written: tuple[Any, ...] | None = None
    """What the written ``request`` column held (``_request_key``): rewritten when it changed."""
    ledger: LedgerEntry | None = None
    settled: asyncio.Future[None] | None = None
    failures: int = 0
    batch: int = 0
    """The writer's batch count when the run started: a run still running in the batch that
    gathered its start is not written yet."""


class StoreRecorder:
    """Records runs in ``store``; ``source`` says who ran them (``server``, ``cli``,
    ``library``). Started by its first run (or ``start``), ended by ``aclose`` (which writes
    what is pending). ``owns_store``: ``aclose`` closes the store too."""

    def __init__(
        self,
        store: Store,
        *,
        source: str,
        redact: Redactor | None = None,
        owns_store: bool = False,
        keep_days: float = 0.0,
        max_mb: float = 0.0,
        flush_interval: float = FLUSH_INTERVAL,
        heartbeat: float = HEARTBEAT,
        lease: float = LEASE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.store = store
        self.source = source
        self.instance = Instance.this_process(uuid.uuid4().hex, source)
        self._redact = redact or Redactor()
        self._owns_store = owns_store
        self._keep_days, self._max_mb = keep_days, max_mb
        self._flush_interval, self._heartbeat, self._lease = flush_interval, heartbeat, lease
        self._max_pending = max_pending
        self._runs: dict[str, _Tracked] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        """Set when somebody waits for a write (``hurry``, closing): the writer stops gathering."""
        self._progress = asyncio.Event()
        """Set (and replaced) after every batch: for those waiting for ``room``."""
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[bool] | None = None
        self._full_logged = False
        self._disabled = False
        self._batches = 0

    @classmethod
    def for_settings(cls, settings: Settings, *, source: str) -> StoreRecorder:
        return cls(
            Store.for_settings(settings),
            source=source,
            redact=Redactor.from_settings(settings),
            owns_store=True,
            keep_days=settings.store.keep_days,
            max_mb=settings.store.max_mb,
        )

    # -- the engine's side -----------------------------------------------------------------

    def start_run(self, start: RunStart) -> RunLog:
        """A trace for a new run (never raises; a run past ``max_pending`` is not recorded)."""
        run = RunLog(start, source=self.source, on_change=self._changed)
        if self._closing or self._disabled:
            return run
        if len(self._runs) >= self._max_pending:
            if not self._full_logged:
                log.warning(
                    "%d runs wait to be written: new runs are not recorded", len(self._runs)
                )
                self._full_logged = True
            return run
        self._runs[start.id] = _Tracked(run, batch=self._batches)
        self._start()
        self._changed(run)
        return run

    def discard(self, run: RunLog) -> None:
        """Forget a run not written yet (a request refused before it ran)."""
        tracked = self._runs.get(run.run_id)
        if tracked is not None and not tracked.inserted:
            del self._runs[run.run_id]
            self._dirty.discard(run.run_id)

    def settle(
        self, run: RunLog, end: RunEnd, ledger: LedgerEntry | None = None
    ) -> asyncio.Future[None]:
        """End the run now and hand it to the writer with its spend (``ledger``): its calls
        become spend rows and its reservation is released, in the run's transaction of the next
        batch. The future is done when that is committed, failed if it cannot be.

        The end and the spend are handed over together, so the writer never writes the end
        without the spend."""
        settled = asyncio.get_running_loop().create_future()
        tracked = self._runs.get(run.run_id)
        run.finish(end)
        if tracked is None:
            why = f"run {run.run_id} is not being recorded (see the log)"
            settled.set_exception(RuntimeError(why))
            return settled
        tracked.ledger = ledger
        tracked.settled = settled
        self._changed(run)
        return settled

    async def room(self) -> None:
        """Return once fewer than half of ``max_pending`` runs wait to be written. A server
        awaits this before each request: when its writer falls behind, requests wait for it
        instead of being answered with no record of their spend (past ``max_pending`` new runs
        are not recorded)."""
        while len(self._runs) >= self._max_pending // 2 and not (self._closing or self._disabled):
            self._urgent.set()
            await self._progress.wait()

    def hurry(self) -> None:
        """Write what is pending now instead of at the end of the flush interval."""
        self._urgent.set()

    async def start(self) -> None:
        """Register this process and recover the runs of dead ones; then the writer runs."""
        self._start()
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def aclose(self) -> None:
        """Write everything pending (for at most ``CLOSE_TIMEOUT`` seconds: a database that
        does not answer does not hold the process), mark what is still running
        ``unfinished``, stop."""
        self._closing = True
        self._wake.set()
        self._urgent.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
            if late:
                log.warning(
                    "the run store did not answer in %ss: %d run(s) not written",
                    CLOSE_TIMEOUT,
                    len(self._runs),
                )
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ready is not None and self._ready.done() and self._ready.result():
            try:
                await self.store.runs.retire(self.instance)
            except Exception:
                log.exception("could not retire this process's runs")
        if self._owns_store:
            await self.store.aclose()

    # -- the writer ------------------------------------------------------------------------

    def _changed(self, run: RunLog) -> None:
        if run.run_id in self._runs:
            self._dirty.add(run.run_id)
            self._wake.set()

    def _start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._tasks.append(asyncio.create_task(self._write_loop(), name="openfusion-runs"))

    async def _write_loop(self) -> None:
        assert self._ready is not None
        try:
            await self.store.init()
            await self.store.runs.register(self.instance)
            recovered = await self.store.runs.sweep(self.instance, lease=self._lease)
            if recovered:
                log.warning("marked %d run(s) of stopped processes as unfinished", recovered)
        except (Exception, asyncio.CancelledError) as exc:  # cancelled: closed before it opened
            log.warning("runs are not recorded: %s", str(exc) or "the store did not open in time")
            self._disabled = True
            self._ready.set_result(False)
            self._fail_all(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        maintenance = asyncio.create_task(self._maintain(), name="openfusion-runs-heartbeat")
        self._ready.set_result(True)
        try:
            while not (self._closing and not self._dirty):
                if not self._closing:
                    await self._wake.wait()
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):  # gather more, unless one waits
                        await asyncio.wait_for(self._urgent.wait(), self._flush_interval)
                hurried = self._urgent.is_set() or self._closing
                self._urgent.clear()
                try:
                    await self._write(sorted(self._dirty), defer=not hurried)
                except Exception:  # a bug; the writer must go on (requests wait for it)
                    log.exception("the run writer failed")
                self._progress.set()
                self._progress = asyncio.Event()
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance

    async def _write(self, run_ids: list[str], *, defer: bool = True) -> None:
        """Write ``run_ids``; with ``defer``, not those started in this batch and running."""
        self._dirty.difference_update(run_ids)
        gathered, self._batches = self._batches, self._batches + 1
        batch = []
        for number, part in enumerate(_sliced(run_ids)):
            if number:
                await asyncio.sleep(0)  # let requests on: a big batch is many milliseconds
            for run_id in part:
                tracked = self._runs.get(run_id)
                if tracked is None:
                    continue
                if defer and tracked.batch == gathered and not tracked.log.finished:
                    self._dirty.add(run_id)  # started just now: the next batch, if it runs on
                    self._wake.set()
                    continue
                try:
                    batch.append((tracked, self._snapshot(tracked)))
                except Exception:  # a bug: this run cannot be written, the others still are
                    log.exception("cannot record run %s", run_id)
                    self._drop(tracked, "its record could not be built")
        if not batch:
            return
        try:
            async with self.store.db.write() as conn:
                await self._save(conn, batch)
        except Exception:
            if len(batch) == 1:
                self._failed(*batch[0])
                return
            for item in batch:  # one at a time, to find the one that fails
                try:
                    async with self.store.db.write() as conn:
                        await self._save(conn, [item])
                except Exception:
                    self._failed(*item)
                else:
                    self._written(*item)
            return
        for item in batch:
            self._written(*item)

    def _drop(self, tracked: _Tracked, why: str) -> None:
        run_id = tracked.log.run_id
        self._runs.pop(run_id, None)
        if tracked.settled is not None and not tracked.settled.done():
            tracked.settled.set_exception(RuntimeError(f"run {run_id} is not recorded: {why}"))

    def _failed(self, tracked: _Tracked, snapshot: _Snapshot) -> None:
        tracked.failures += 1
        run_id = tracked.log.run_id
        if tracked.settled is not None and not tracked.settled.done():
            tracked.settled.set_exception(RuntimeError(f"recording run {run_id} failed"))
        if tracked.failures >= MAX_ATTEMPTS:
            log.exception("giving up on recording run %s", run_id)
            self._drop(tracked, "the database failed")
            return
        log.warning("recording run %s failed; will retry", run_id, exc_info=True)
        self._dirty.add(run_id)
        asyncio.get_running_loop().call_later(RETRY_AFTER, self._wake.set)

    def _written(self, tracked: _Tracked, snapshot: _Snapshot) -> None:
        tracked.inserted = True
        tracked.request_written = snapshot.request_key
        tracked.span_versions.update(snapshot.span_versions)
        tracked.failures = 0
        if snapshot.ledger is not None:
            tracked.ledger = None
        if snapshot.final and tracked.log.version == snapshot.version:
            self._runs.pop(tracked.log.run_id, None)
        if tracked.settled is not None and not tracked.settled.done() and snapshot.final:
            tracked.settled.set_result(None)

    def _fail_all(self, exc: BaseException) -> None:
        for tracked in self._runs.values():
            if tracked.settled is not None and not tracked.settled.done():
                tracked.settled.set_exception(RuntimeError(f"runs are not recorded: {exc}"))
        self._runs.clear()
        self._dirty.clear()

    async def _maintain(self) -> None:
        """Heartbeat; recover dead processes' runs; prune now and then."""
        since_prune = PRUNE_EVERY
        while True:
            try:
                if since_prune >= PRUNE_EVERY and (self._keep_days or self._max_mb):
                    since_prune = 0.0
                    pruned = await self.store.runs.prune(
                        keep_days=self._keep_days, max_mb=self._max_mb
                    )
                    if pruned.by_age or pruned.by_size:
                        log.info("pruned %d old run(s)", pruned.by_age + pruned.by_size)
                await asyncio.sleep(self._heartbeat)
                since_prune += self._heartbeat
                if not await self.store.runs.heartbeat(self.instance):
                    log.warning(
                        "this process was taken for dead (no heartbeat for %ss)", self._lease
                    )
                await self.store.runs.sweep(self.instance, lease=self._lease)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("run store maintenance failed; will retry", exc_info=True)

    # -- rows ------------------------------------------------------------------------------

    def _scrub(self, row: dict[str, Any]) -> dict[str, Any]:
        scrubbed: dict[str, Any] = self._redact.value(row)
        return scrubbed

    def _snapshot(self, tracked: _Tracked) -> _Snapshot:
        """What to write of a run, taken now (the run may change while it is written)."""
        run = tracked.log
        request_key = _request_key(run)
        row = _run_row(run, self.instance.id, request=tracked.request_written != request_key)
        row = self._scrub(row)
        spans = [
            (span.seq not in tracked.span_versions, self._scrub(_span_row(run.run_id, span)))
            for span in run.spans
            if tracked.span_versions.get(span.seq) != span.version
        ]
        ledger = tracked.ledger if run.finished else None
        return _Snapshot(
            version=run.version,
            row=row,
            spans=spans,
            span_versions={s.seq: s.version for s in run.spans},
            ledger=ledger,
            calls=run.calls() if ledger else [],
            final=run.finished,
            request_key=request_key,
        )

    async def _save(
        self, conn: AsyncConnection, batch: Sequence[tuple[_Tracked, _Snapshot]]
    ) -> None:
        """Write a batch: a statement per kind of change and part (``SLICES``; compiled once,
        executed for many rows), then the spend of the runs that settle."""
        settling = [  # a run inserted in this batch was not taken for abandoned
            t.log.run_id for t, snapshot in batch if snapshot.ledger is not None and t.inserted
        ]
        recovered: set[str] = set()
        if settling:  # a run another process took for abandoned has been charged already
            found = await conn.scalars(
                select(runs.c.id).where(runs.c.id.in_(settling), runs.c.status == "unfinished")
            )
            recovered = set(found.all())
        new_runs, changed_runs, new_spans, changed_spans = [], [], [], []
        for tracked, snapshot in batch:
            if tracked.inserted:
                changed_runs.append(_keyed(snapshot.row, {"id": "row_id"}))
            else:
                new_runs.append(snapshot.row)
            for new, span in snapshot.spans:
                if new:
                    new_spans.append(span)
                else:
                    changed_spans.append(_keyed(span, {"run_id": "row_id", "seq": "row_seq"}))
        for rows in _sliced(new_runs):
            await self.store.db.insert_many(conn, runs, rows)
        for group in _same_columns(changed_runs):  # with and without ``request``
            for rows in _sliced(group):
                await conn.execute(_UPDATE_RUN, rows)
        for rows in _sliced(new_spans):
            await self.store.db.insert_many(conn, run_spans, rows)
        for rows in _sliced(changed_spans):
            await conn.execute(_UPDATE_SPAN, rows)
        unreserved: list[tuple[str | None, str, list[SpendRow]]] = []
        for tracked, snapshot in batch:
            ledger = snapshot.ledger
            if ledger is None:
                continue
            run_id = tracked.log.run_id
            if run_id in recovered:  # pragma: no cover - needs a heartbeat stalled past the lease
                log.warning("run %s was taken for abandoned and charged as recorded then", run_id)
                continue
            spent = [SpendRow(c.stage, c.model, c.cost) for c in snapshot.calls]
            if ledger.reservation_id is None:  # nothing to release: one insert for them all
                unreserved.append((ledger.key_id, run_id, spent))
            else:
                await self.store.ledger.settle_in(
                    conn, ledger.reservation_id, run_id, spent, key_id=ledger.key_id
                )
        for part in _sliced(unreserved):
            await self.store.ledger.record_in(conn, part)


_UPDATE_RUN = update(runs).where(runs.c.id == bindparam("row_id"))
_UPDATE_SPAN = update(run_spans).where(
    run_spans.c.run_id == bindparam("row_id"), run_spans.c.seq == bindparam("row_seq")
)


def _keyed(row: dict[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """An update's parameters: the key columns renamed to the WHERE clause's parameters."""
    return {keys.get(column, column): value for column, value in row.items()}


def _sliced(rows: list[T]) -> list[list[T]]:
    """``rows`` in at most ``SLICES`` parts of at least ``SLICE``: runs snapshotted, or rows
    bound to one statement, between two turns of the event loop."""
    size = max(SLICE, -(-len(rows) // SLICES))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _same_columns(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    return list(groups.values())


@dataclass(frozen=True, slots=True)
class _Snapshot:
    version: int
    row: dict[str, Any]
    spans: list[tuple[bool, dict[str, Any]]]
    span_versions: dict[int, int]
    ledger: LedgerEntry | None
    calls: list[Any]
    final: bool
    request_key: tuple[Any, ...]


def _request_key(run: RunLog) -> tuple[Any, ...]:
    """What changes the ``request`` column after the run started: its plan (the panel's
    members and options are known once the request is planned, and a write may come first)."""
    return (run.preset, len(run.members), len(run.options))


def _run_row(run: RunLog, instance_id: str, *, request: bool = True) -> dict[str, Any]:
    """The run's row; without ``request`` when that column is written already (unchanged: a
    long conversation is not rebuilt at every batch of a run written several times)."""
    start = run.start
    result = run.result
    end = run.end
    usage = end.usage if end is not None and end.usage is not None else None
    totals: dict[str, Any] | None = None
    if usage is not None:
        totals = usage.to_dict() | {"cost_details": dict(end.cost_details) if end else {}}
        totals["fusion_status"] = result.status if result is not None else None
    citations = None
    if result is not None:
        citations = {
            "sources": list(result.sources),
            "annotations": list(result.annotations),
            "unverified_citations": list(result.unverified_citations),
        }
    row = {
        "id": run.run_id,
        "kind": run.kind,
        "status": run.status,
        "source": run.source,
        "instance_id": instance_id,
        "key_id": start.key_id,
        "reservation_id": start.reservation_id,
        "model": start.model,
        "preset": run.preset,
        "judge": run.judge,
        "question": run.question(),
        "answer": run.answer,
        "analysis": run.analysis,
        "citations": citations,
        "failure_reason": end.failure_reason if end else None,
        "failure_message": end.failure_message if end else None,
        "totals": totals,
        "cost_nano": None if usage is None or usage.cost is None else to_nano(usage.cost),
        "streamed": start.streamed,
        "created_at": run.created_at,
        "updated_at": utcnow(),
        "finished_at": run.finished_at,
        "latency_ms": run.latency_ms,
    }
    if request:
        row["request"] = {
            "messages": [message_dict(m) for m in start.messages],
            "options": dict(run.options),
            "members": list(run.members),
        }
    return row


def _span_row(run_id: str, span: Span) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "seq": span.seq,
        "kind": span.kind,
        "name": span.name[:255],
        "stage": span.stage,
        "member": span.member,
        "status": span.status,
        "start_ms": span.start_ms,
        "end_ms": span.end_ms,
        "model": span.model[:255] if span.model else None,
        "cost_nano": None if span.cost is None else to_nano(span.cost),
        "data": dict(span.data),
    }
