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
equals the sum of the recorded calls' costs, and a request's spend counts before its response
ends. A request refused before it ran (a bad model id) has no run: its reservation is released.
"""

from __future__ import annotations

import asyncio
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
        """Record the run's end and its spend, and release the reservation — once (a second
        call does nothing). Runs as a task of its own: it completes even when the request is
        cancelled while waiting for it. A failure is logged (the reservation then lapses after
        its time to live), never raised at the client."""
        if self._settled:
            return
        self._settled = True
        await self.metering.settle(self)


class Metering:
    """The server's side of the ledger: a reservation per request, settled with its run.

    With ``budgets`` (Redis: ``openfusion.cluster.HotBudgets``) reservations are checked there
    and released there after the database has the run's spend; without, in the database.
    ``after`` is awaited once per request when it has settled (metrics, traces, token counts),
    whatever happened; its failure is logged."""

    def __init__(
        self,
        ledger: SpendLedger,
        recorder: StoreRecorder,
        default_reservation: float,
        *,
        budgets: HotBudgets | None = None,
        after: Callable[[MeteredRun], Awaitable[None]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.recorder = recorder
        self.default_reservation = default_reservation
        self.budgets = budgets
        self.after = after
        self._settling: set[asyncio.Task[None]] = set()

    async def start(
        self, key_id: str | None, generation_id: str, max_cost: float | None
    ) -> MeteredRun:
        """Reserve ``max_cost`` of the key's budget, or the default reservation capped to what
        is left (nothing for no key or a key without a budget). ``APIError(402)`` when it does
        not fit."""
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
        task = asyncio.create_task(self._settle(run))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _settle(self, run: MeteredRun) -> None:
        reservation = run.reservation
        reservation_id = reservation.id if reservation else None
        charged = 0
        try:
            if run.log is not None:
                entry = LedgerEntry(reservation_id, run.key_id)
                await self.recorder.settle(run.log, run.end(), entry)
                rows = [SpendRow(c.stage, c.model, c.cost) for c in run.log.calls()]
                charged = charge_of(rows, reservation.amount_nano if reservation else None)
            elif reservation_id is not None:
                await self.ledger.settle(reservation_id, run.generation_id, [])
        except Exception:
            log.exception("could not record the run and spend of %s", run.generation_id)
            if self.budgets is not None and reservation is not None:
                self.budgets.forget(reservation)  # it holds in Redis until the next rebuild
        else:
            if self.budgets is not None and reservation is not None:
                await self.budgets.release(reservation, charged)
        finally:
            if self.after is not None:
                try:
                    await self.after(run)
                except Exception:
                    log.exception("after settling %s", run.generation_id)

    async def drain(self) -> None:
        """Wait for the settlements still running (at shutdown, before the store closes)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
