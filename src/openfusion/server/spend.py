"""Metering a request: hold part of its API key's budget, then record what its calls cost.

    run = await metering.start(key_id, generation_id, body.model, body.max_cost)  # or 402
    try:
        ... run the request with max_cost = run.reservation.amount; run.see(each output) ...
    finally:
        await run.settle()

The spend rows of a run are one per panel member that answered (``Final.responses``) and one per
other stage of ``Final.cost_details`` (``analysis``, ``synthesis``, ``caller``, ``call``); their
sum is the response's ``usage.cost``. A run that ends without its ``Final`` (an error, a client
that went away) is recorded with the calls its progress events reported as finished.
"""

from __future__ import annotations

import asyncio
import logging

from openfusion.engine import MemberEvent, StageEvent
from openfusion.server.completions import Final, Output, Progress
from openfusion.server.errors import APIError
from openfusion.store import BudgetExhausted, Reservation, SpendLedger, SpendRow

log = logging.getLogger("openfusion.server")


def spend_rows(final: Final, model: str) -> list[SpendRow]:
    """The ledger rows of a finished run of the request for ``model``."""
    judge = final.fusion.get("judge") if final.fusion else None
    stage_models = {"analysis": judge, "synthesis": judge, "caller": model, "call": model}
    rows = [SpendRow("panel", r["model"], r["cost"]) for r in final.responses]
    rows += [
        SpendRow(stage, stage_models.get(stage), cost)
        for stage, cost in final.cost_details.items()
        if stage != "panel"  # the members' rows above add up to it
    ]
    return rows


class MeteredRun:
    """One request's spend: its reservation (if its key has a budget), and the rows of its
    run so far — the finished calls its progress events report, replaced by the complete
    breakdown when its ``Final`` arrives."""

    def __init__(
        self,
        metering: Metering,
        key_id: str | None,
        generation_id: str,
        model: str,
        reservation: Reservation | None,
    ) -> None:
        self.metering = metering
        self.key_id = key_id
        self.generation_id = generation_id
        self.model = model
        self.reservation = reservation
        self.rows: list[SpendRow] = []
        self._finished = False
        self._settled = False

    def see(self, item: Output | None) -> None:
        if self._finished or item is None:
            return
        if isinstance(item, Final):
            self.rows = spend_rows(item, self.model)
            self._finished = True
        elif isinstance(item, Progress):
            event = item.event
            if isinstance(event, MemberEvent) and event.state == "done" and event.usage:
                self.rows.append(SpendRow("panel", event.name, event.usage.cost))
            elif isinstance(event, StageEvent) and event.state != "running" and event.usage:
                self.rows.append(SpendRow(event.stage, None, event.usage.cost))

    async def settle(self) -> None:
        """Record the rows and drop the reservation, once (a second call does nothing).

        Runs as a task of its own: it completes even when the request is cancelled while
        waiting for it. A failure is logged (the reservation then lapses after its time to
        live), never raised at the client.
        """
        if self._settled:
            return
        self._settled = True
        await self.metering.settle(self)


class Metering:
    """The server's side of the ledger: a reservation per request, settled after its run."""

    def __init__(self, ledger: SpendLedger, default_reservation: float) -> None:
        self.ledger = ledger
        self.default_reservation = default_reservation
        self._settling: set[asyncio.Task[None]] = set()

    async def start(
        self, key_id: str | None, generation_id: str, model: str, max_cost: float | None
    ) -> MeteredRun:
        """Reserve ``max_cost`` of the key's budget, or the default reservation capped to what
        is left (nothing for no key or a key without a budget). ``APIError(402)`` when it does
        not fit."""
        reservation = None
        if key_id is not None:
            try:
                if max_cost is not None:
                    reservation = await self.ledger.reserve(key_id, max_cost)
                else:
                    reservation = await self.ledger.reserve(
                        key_id, self.default_reservation, up_to=True
                    )
            except BudgetExhausted as exc:
                raise APIError(402, str(exc), {"limit": exc.limit, "spent": exc.spent}) from exc
        return MeteredRun(self, key_id, generation_id, model, reservation)

    async def settle(self, run: MeteredRun) -> None:
        task = asyncio.create_task(self._settle(run, list(run.rows)))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _settle(self, run: MeteredRun, rows: list[SpendRow]) -> None:
        reservation_id = run.reservation.id if run.reservation else None
        try:
            await self.ledger.settle(reservation_id, run.generation_id, rows, key_id=run.key_id)
        except Exception:
            log.exception("could not record the spend of %s in the ledger", run.generation_id)

    async def drain(self) -> None:
        """Wait for the settlements still running (at shutdown, before the ledger closes)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
