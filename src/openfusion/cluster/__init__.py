"""What replicas share besides the database: Redis, when ``redis_url`` is set.

``Shared.for_settings(settings, ledger)`` gives the server its rate limiter, its budget
reservations and its circuit breaker: with Redis, shared by every replica using the same Redis
and ``redis_prefix`` (``RedisLimiter``, ``HotBudgets``, ``SharedBreaker``); without it, this
process's own (``LocalLimiter``, the database's locked reservations, the engine's breaker),
exactly as a single server works. Redis holds nothing that cannot be lost: the database stays
the truth (see ``budget.py``), and a Redis that cannot be reached degrades each part to its
one-process form (logged), never to an error for the client, and is then left alone for a few
seconds (``RedisGate``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from openfusion.cluster.breaker import SharedBreaker
from openfusion.cluster.budget import HotBudgets, budget_key
from openfusion.cluster.gate import RedisGate
from openfusion.cluster.ratelimit import LocalLimiter, RateLimiter, RedisLimiter, retry_after
from openfusion.engine.policy import CircuitBreaker
from openfusion.errors import ConfigError
from openfusion.settings import Settings
from openfusion.store.ledger import SpendLedger

log = logging.getLogger(__name__)

__all__ = [
    "HotBudgets",
    "LocalLimiter",
    "RateLimiter",
    "RedisGate",
    "RedisLimiter",
    "Shared",
    "SharedBreaker",
    "connect",
    "forget_budget",
    "retry_after",
]


@dataclass
class Shared:
    limiter: RateLimiter
    budgets: HotBudgets | None = None
    """``None``: reservations go straight to the database."""
    breaker: CircuitBreaker | None = None
    """``None``: the engine makes its own (one per process)."""
    redis: Redis | None = None

    @classmethod
    def for_settings(cls, settings: Settings, ledger: SpendLedger) -> Shared:
        if not settings.redis_url:
            return cls(LocalLimiter())
        redis = connect(settings.redis_url)
        prefix = settings.redis_prefix
        retries = settings.retries
        gate = RedisGate()  # one for the process: a Redis down for one part is down for all
        return cls(
            RedisLimiter(redis, prefix, gate),
            HotBudgets(redis, prefix, ledger, gate=gate),
            SharedBreaker(
                redis, prefix, retries.breaker_threshold, retries.breaker_cooldown, gate=gate
            ),
            redis,
        )

    async def start(self) -> None:
        """Start sharing the breaker; say in the log if Redis does not answer (each part then
        works per process until it does)."""
        if self.redis is not None:
            try:
                await self.redis.ping()
            except RedisError as exc:
                log.warning("Redis does not answer (%s): limits and breaker per process", exc)
        if isinstance(self.breaker, SharedBreaker):
            self.breaker.start()

    async def aclose(self) -> None:
        if isinstance(self.breaker, SharedBreaker):
            await self.breaker.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def connect(url: str) -> Redis:
    """A client for ``redis_url`` (connections are made when first used)."""
    try:
        client: Redis = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    except ValueError as exc:
        raise ConfigError(
            f"redis_url: {exc}; expected e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS)"
        ) from exc
    return client


async def forget_budget(settings: Settings, key_id: str) -> None:
    """Drop a key's budget state in Redis, so that a changed budget applies from the next
    request instead of within ``DEFAULT_REFRESH`` seconds (nothing to do without Redis)."""
    if not settings.redis_url:
        return
    redis = connect(settings.redis_url)
    try:
        await redis.delete(budget_key(settings.redis_prefix, key_id))
    except RedisError as exc:
        log.warning("could not reach Redis (%s): the new budget applies within 30 s", exc)
    finally:
        await redis.aclose()
