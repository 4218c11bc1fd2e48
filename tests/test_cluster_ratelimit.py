"""Per-key rate limits: the sliding minute in one process, and in Redis shared by replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import REDIS_URL
from redis.asyncio import Redis

from openfusion.cluster import LocalLimiter, RedisGate, RedisLimiter, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_requests_per_minute_slide_and_say_how_long_to_wait() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    for _ in range(3):
        assert await limiter.admit("k", 3, None) is None
        clock.now += 10
    assert await limiter.admit("k", 3, None) == pytest.approx(30.0)  # the first expires at 60 s
    assert await limiter.admit("other", 3, None) is None  # per key
    clock.now += 30
    assert await limiter.admit("k", 3, None) is None  # the first left the window
    assert await limiter.admit("k", 3, None) == pytest.approx(10.0)


async def test_tokens_per_minute_count_what_ended_runs_used() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    assert await limiter.admit("k", None, 1000) is None
    await limiter.charge("k", 600)
    clock.now += 20
    assert await limiter.admit("k", None, 1000) is None  # 600 < 1000: admitted
    await limiter.charge("k", 500)
    assert await limiter.admit("k", None, 1000) == pytest.approx(40.0)  # until the 600 expire
    clock.now += 40
    assert await limiter.admit("k", None, 1000) is None


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after(s) for s in (0.001, 1.0, 1.2, 59.9)] == ["1", "1", "2", "60"]


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_redis_limit_holds_across_replicas(redis: Redis, redis_prefix: str) -> None:
    """Two limiters on two connections (two replicas): 30 concurrent requests, rpm 7."""
    other = Redis.from_url(REDIS_URL)
    try:
        a, b = RedisLimiter(redis, redis_prefix), RedisLimiter(other, redis_prefix)
        answers = await asyncio.gather(*(limiter.admit("team", 7, None) for limiter in [a, b] * 15))
    finally:
        await other.aclose()
    admitted = [w for w in answers if w is None]
    assert len(admitted) == 7
    waits = [w for w in answers if w is not None]
    assert all(0 < w <= 60 for w in waits)
    assert await a.admit("someone-else", 7, None) is None


async def test_redis_tokens_per_minute(redis: Redis, redis_prefix: str) -> None:
    limiter = RedisLimiter(redis, redis_prefix)
    assert await limiter.admit("team", None, 100) is None
    await limiter.charge("team", 60)
    assert await limiter.admit("team", None, 100) is None
    await limiter.charge("team", 50)
    wait = await limiter.admit("team", None, 100)
    assert wait is not None and 59 < wait <= 60


async def test_redis_unreachable_falls_back_to_this_process(redis_prefix: str) -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    clock = Clock()
    try:
        limiter = RedisLimiter(dead, redis_prefix, RedisGate(pause=5, clock=clock))
        assert await limiter.admit("team", 1, None) is None
        calls: list[object] = []

        async def counted(**kwargs: object) -> int:
            calls.append(kwargs)
            return 0

        limiter._admit = counted  # type: ignore[assignment]
        # The gate is shut: Redis is left alone, the limit still holds, in this process.
        assert await limiter.admit("team", 1, None) is not None
        assert calls == []
        clock.now += 5  # the gate opens again: Redis is asked
        assert await limiter.admit("team", 1, None) is None
        assert len(calls) == 1
    finally:
        await dead.aclose()
