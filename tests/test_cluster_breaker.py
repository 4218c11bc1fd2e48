"""The circuit breaker shared through Redis: failures counted by every replica open the
circuit for all; a success anywhere closes it everywhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import REDIS_URL
from redis.asyncio import Redis

from openfusion.cluster import SharedBreaker
from openfusion.engine.policy import CircuitOpenError

MODEL = "demo/flaky"


@pytest.fixture
async def replicas(redis_prefix: str) -> AsyncIterator[tuple[SharedBreaker, SharedBreaker]]:
    clients = [Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL)]
    a, b = (SharedBreaker(c, redis_prefix, threshold=3, cooldown=60) for c in clients)
    yield a, b
    for breaker, client in zip((a, b), clients, strict=True):
        await breaker.aclose()
        await client.aclose()


async def settle(*breakers: SharedBreaker) -> None:
    """Let the background Redis writes finish."""
    for breaker in breakers:
        await asyncio.gather(*breaker._tasks)


async def test_failures_on_two_replicas_open_the_circuit_for_both(
    replicas: tuple[SharedBreaker, SharedBreaker],
) -> None:
    a, b = replicas
    a.failure(MODEL)
    b.failure(MODEL)
    await settle(a, b)
    await a.pull()
    assert a.state(MODEL) == "closed"  # 2 of 3: neither alone would open
    b.failure(MODEL)
    await settle(b)
    await a.pull()
    await b.pull()
    assert a.state(MODEL) == b.state(MODEL) == "open"
    with pytest.raises(CircuitOpenError):
        a.check(MODEL)
    assert a.check("demo/healthy") is False  # other models untouched


async def test_a_success_anywhere_closes_it_everywhere(
    replicas: tuple[SharedBreaker, SharedBreaker],
) -> None:
    a, b = replicas
    for _ in range(3):
        a.failure(MODEL)
    await settle(a)
    await b.pull()
    assert b.state(MODEL) == "open"
    a.success(MODEL)  # e.g. a's half-open probe answered
    await settle(a)
    await b.pull()
    assert b.state(MODEL) == "closed"
    assert b.check(MODEL) is False


async def test_a_healthy_model_costs_no_redis_call(
    replicas: tuple[SharedBreaker, SharedBreaker],
) -> None:
    a, _ = replicas
    a.success("demo/healthy")
    assert not a._tasks
