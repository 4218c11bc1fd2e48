"""Metering a request: hold part of its API key's budget, record its run, charge its calls.

    run = await metering.start(key_id, generation_id, body.model, body.max_cost)  # or 402
    run.record(start)            # once the request is planned: its run is recorded from now on
    try:
        ... run the request with max_cost = run.reservation.amount; run.see(each output) ...
    except APIError as exc:
        run.fail(exc)
    finally:
        await run.settle()

``settle`` ends the run's record and, in the same transaction, writes one spend row per inner
call the run recorded (model calls, tool calls) and releases the reservation: the ledger always
equals the sum of the recorded calls' costs. It is written off the request's path, in the
recorder's next batch (measured: a transaction per request was two thirds of a pass-through
request's added latency); until then the reservation keeps holding the request's budget, so
no key spends past it meanwhile. What must count before the answer ends (metrics, the key's
tokens per minute) is done in ``settle`` itself; a reader of this process (``written``) waits
for the pending writes. A request refused before it ran (a bad model id) has no run: its
reservation is released.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from openfusion.cluster import HotBudgets
from openfusion.engine.runlog import RunLog
from openfusion.engine.trace import RunEnd, RunStart
from openfusion.server.completions import Final, Output, Text
from openfusion.server.errors import APIError
from openfusion.store import BudgetExhausted, Reservation, SpendLedger, SpendRow
from openfusion.store.ledger import charge_of
from openfusion.store.recorder import LedgerEntry, StoreRecorder

log = logging.getLogger("openfusion.server")


class MeteredRun:
    """One request: its reservation (if its key has a budget), its run's record, and how it
    ended (the answer's text and ``Final``, or an error)."""

    def __init__(
        self,
        metering: Metering,
        key_id: str | None,
        generation_id: str,
        reservation: Reservation | None,
    ) -> None:
        self.metering = metering
        self.key_id = key_id
        self.generation_id = generation_id
        self.reservation = reservation
        self.tpm: int | None = None
        """The key's tokens per minute, when it has a limit (its tokens are counted at the end)."""
        self.log: RunLog | None = None
        self._texts: list[str] = []
        self._final: Final | None = None
        self._error: APIError | None = None
        self._settled = False

    def record(self, start: RunStart) -> RunLog:
        """Start recording the run (its id is the generation id)."""
        self.log = self.metering.recorder.start_run(start)
        return self.log

    def discard(self) -> None:
        """The request was refused before it ran: it leaves no run."""
        if self.log is not None:
            self.metering.recorder.discard(self.log)
            self.log = None

    def see(self, item: Output | None) -> None:
        if isinstance(item, Text):
            self._texts.append(item.delta)
        elif isinstance(item, Final):
            self._final = item

    def fail(self, error: APIError) -> None:
        self._error = error

    def end(self) -> RunEnd:
        final, error = self._final, self._error
        if final is not None:
            fusion = final.fusion or {}
            return RunEnd(
                "error" if fusion.get("status") == "error" else "ok",
                "".join(self._texts),
                final.usage,
                final.cost_details,
                failure_reason=fusion.get("failure_reason"),
                failure_message=fusion.get("failure_message"),
            )
        if error is not None:
            reason = error.metadata.get("failure_reason")
            return RunEnd(
                "cancelled" if error.status == 499 else "error",
                "".join(self._texts),
                failure_reason=reason if isinstance(reason, str) else None,
                failure_message=error.message,
            )
        return RunEnd("cancelled", "".join(self._texts))

    async def settle(self) -> None:
        """End the run's record; its spend is written and the reservation released in a task
        that outlives the request — once (a second call does nothing). A failure is logged (the
        reservation then lapses after its time to live), never raised at the client."""
        if self._settled:
            return
        self._settled = True
        await self.metering.settle(self)


class Metering:
    """The server's side of the ledger: a reservation per request, settled with its run.

    With ``budgets`` (Redis: ``openfusion.cluster.HotBudgets``) reservations are checked there
    and released there after the database has the run's spend; without, in the database.
    ``after`` is called once per request when its run has ended (metrics, traces, token
    counts), whatever happened; what it returns, if anything, is awaited (shielded: a cancelled
    request still counts); its failure is logged. Most requests have nothing to await: no
    task, no turn of the event loop before the answer goes out."""

    def __init__(
        self,
        ledger: SpendLedger,
        recorder: StoreRecorder,
        default_reservation: float,
        *,
        budgets: HotBudgets | None = None,
        after: Callable[[MeteredRun], Awaitable[None] | None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.recorder = recorder
        self.default_reservation = default_reservation
        self.budgets = budgets
        self.after = after
        self._settling: dict[str, asyncio.Future[None]] = {}
        """Generation id -> its settlement, until written."""

    async def start(
        self, key_id: str | None, generation_id: str, max_cost: float | None
    ) -> MeteredRun:
        """Reserve ``max_cost`` of the key's budget, or the default reservation capped to what
        is left (nothing for no key or a key without a budget). ``APIError(402)`` when it does
        not fit. Waits first while the run writer is far behind (``StoreRecorder.room``)."""
        await self.recorder.room()
        reservation = None
        if key_id is not None:
            reserve = self.ledger.reserve if self.budgets is None else self.budgets.reserve
            try:
                if max_cost is not None:
                    reservation = await reserve(key_id, max_cost)
                else:
                    reservation = await reserve(key_id, self.default_reservation, up_to=True)
            except BudgetExhausted as exc:
                metadata = {"limit": exc.limit, "spent": exc.spent}
                if exc.overshoot_nano:  # an upstream billed past what requests reserved
                    metadata["overshoot"] = exc.overshoot
                raise APIError(402, str(exc), metadata) from exc
        return MeteredRun(self, key_id, generation_id, reservation)

    async def settle(self, run: MeteredRun) -> None:
        """Hand the run's end and spend to the recorder (written in a task: ``written``), then
        await ``after`` (shielded: a cancelled request still counts)."""
        written = None
        if run.log is not None:
            entry = LedgerEntry(run.reservation.id if run.reservation else None, run.key_id)
            written = self.recorder.settle(run.log, run.end(), entry)
        pending: asyncio.Future[None]
        if written is not None and (run.reservation is None or self.budgets is None):
            # Nothing to do once written but to note a failure: a callback, not a task (a
            # batch's commit woke hundreds of tasks at once, holding the loop for milliseconds).
            pending = written
            pending.add_done_callback(functools.partial(_note_failure, run.generation_id))
        else:
            pending = asyncio.create_task(self._settle(run, written))
        self._settling[run.generation_id] = pending
        pending.add_done_callback(lambda _: self._settling.pop(run.generation_id, None))
        if self.after is not None:
            try:
                waiting = self.after(run)
            except Exception:
                log.exception("after settling %s", run.generation_id)
                return
            if waiting is not None:  # only then a task and a turn of the loop
                await asyncio.shield(self._after(run, waiting))

    async def written(self, generation_id: str | None = None) -> None:
        """Wait until this process's settlement of ``generation_id`` (``None``: of every run)
        is written, if one is pending: a client reading a run just answered finds it whole."""
        if generation_id is None:
            tasks = list(self._settling.values())
        else:
            tasks = [t for t in (self._settling.get(generation_id),) if t is not None]
        if tasks:
            self.recorder.hurry()
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    async def _settle(self, run: MeteredRun, written: asyncio.Future[None] | None) -> None:
        """The spend written, the reservation released in Redis (``budgets``); or, with no
        record, the reservation released in the database."""
        reservation = run.reservation
        charged = 0
        try:
            if written is not None and run.log is not None:
                await written
                rows = [SpendRow(c.stage, c.model, c.cost) for c in run.log.calls()]
                charged = charge_of(rows, reservation.amount_nano if reservation else None)
            elif reservation is not None:
                await self.ledger.settle(reservation.id, run.generation_id, [])
        except Exception:
            log.exception("could not record the run and spend of %s", run.generation_id)
            if self.budgets is not None and reservation is not None:
                self.budgets.forget(reservation)  # it holds in Redis until the next rebuild
        else:
            if self.budgets is not None and reservation is not None:
                await self.budgets.release(reservation, charged)

    async def _after(self, run: MeteredRun, waiting: Awaitable[None]) -> None:
        try:
            await waiting
        except Exception:
            log.exception("after settling %s", run.generation_id)

    async def drain(self) -> None:
        """Wait for the settlements still running (at shutdown, before the store closes)."""
        while self._settling:
            self.recorder.hurry()
            await asyncio.gather(*self._settling.values(), return_exceptions=True)


def _note_failure(generation_id: str, written: asyncio.Future[None]) -> None:
    if written.cancelled() or written.exception() is not None:
        log.error(
            "could not record the run and spend of %s",
            generation_id,
            exc_info=None if written.cancelled() else written.exception(),
        )
