"""The load loop both benchmarks share: N calls, C at a time, bounded in count and time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Call = Callable[[], Awaitable[None]]


@dataclass
class Result:
    name: str
    """The client or scenario measured."""
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    """Seconds, of the calls that succeeded."""
    errors: int = 0
    """Calls that raised: counted, not timed."""
    first_error: str | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] if ordered else float("nan")


async def run_load(
    name: str, call: Call, requests: int, concurrency: int, max_seconds: float
) -> Result:
    """``requests`` calls, ``concurrency`` at a time, stopping early after ``max_seconds``.

    A call that raises is counted in ``errors`` (the first one's text kept) and not timed."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                await call()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    first = errors[0] if errors else None
    return Result(name, concurrency, len(latencies), seconds, latencies, len(errors), first)


def failures(results: list[Result]) -> list[str]:
    """A line per cell that had failed calls (they are left out of its timings)."""
    return [
        f"{r.name} at concurrency {r.concurrency}: {r.errors} calls failed, e.g. {r.first_error}"
        for r in results
        if r.errors
    ]
