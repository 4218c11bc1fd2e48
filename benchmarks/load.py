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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] if ordered else float("nan")


async def run_load(
    name: str, call: Call, requests: int, concurrency: int, max_seconds: float
) -> Result:
    """``requests`` calls, ``concurrency`` at a time, stopping early after ``max_seconds``."""
    latencies: list[float] = []
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(name, concurrency, len(latencies), time.perf_counter() - start, latencies)
