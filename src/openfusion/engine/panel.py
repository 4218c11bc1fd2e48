"""The panel fan-out: every member at once, a quorum, and a deadline for stragglers."""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from openfusion.engine.result import MemberFailure, MemberResponse
from openfusion.presets import PanelPolicy, PanelSlot

Outcome = MemberResponse | MemberFailure


@dataclass(frozen=True, slots=True)
class Member:
    index: int
    name: str
    """Unique within the panel: the model id, with ``#k`` when one model fills several slots."""
    slot: PanelSlot


def members_of(panel: Sequence[PanelSlot]) -> list[Member]:
    counts = Counter(slot.model for slot in panel)
    seen: Counter[str] = Counter()
    members = []
    for index, slot in enumerate(panel):
        seen[slot.model] += 1
        name = slot.model if counts[slot.model] == 1 else f"{slot.model}#{seen[slot.model]}"
        members.append(Member(index, name, slot))
    return members


async def gather_panel(
    members: Sequence[Member],
    ask: Callable[[Member], Coroutine[Any, Any, Outcome]],
    policy: PanelPolicy,
    on_deadline: Callable[[Member, float], MemberFailure],
) -> list[Outcome]:
    """Ask every member concurrently; return their outcomes in panel order.

    Once ``policy.min_panel`` members have answered, the rest get at most the straggler wait
    (if the policy sets one); then they are cancelled — which closes their upstream connections —
    and recorded through ``on_deadline``.
    """
    loop = asyncio.get_running_loop()
    tasks = {asyncio.create_task(ask(member)): member for member in members}
    outcomes: dict[int, Outcome] = {}
    pending = set(tasks)
    deadline: float | None = None
    wait = 0.0
    try:
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, pending = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                outcomes[tasks[task].index] = task.result()
            if not done:
                break  # the straggler deadline passed
            if deadline is None and pending:
                answered = [o for o in outcomes.values() if isinstance(o, MemberResponse)]
                straggler_wait = _straggler_wait(policy, answered)
                if straggler_wait is not None:
                    wait = straggler_wait
                    deadline = loop.time() + wait
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for task in pending:
        member = tasks[task]
        late = task.done() and not task.cancelled() and task.exception() is None
        outcomes[member.index] = task.result() if late else on_deadline(member, wait)
    return [outcomes[member.index] for member in members]


def _straggler_wait(policy: PanelPolicy, answered: Sequence[MemberResponse]) -> float | None:
    if len(answered) < policy.min_panel:
        return None
    waits = []
    if policy.straggler_seconds is not None:
        waits.append(policy.straggler_seconds)
    if policy.straggler_factor is not None:
        median = statistics.median(r.latency_ms for r in answered) / 1000
        waits.append(policy.straggler_factor * median)
    return min(waits) if waits else None
