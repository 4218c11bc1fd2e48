"""What replicas share besides the database: Redis, when ``redis_url`` is set.

``Shared.for_settings(settings, ledger)`` gives the server its rate limiter, its budget
reservations and its circuit breaker: with Redis, shared by every replica using the same Redis
and ``redis_prefix`` (``RedisLimiter``, ``HotBudgets``, ``SharedBreaker``); without it, this
process's own (``LocalLimiter``, the database's locked reservations, the engine's breaker),
exactly as a single server works. Redis holds nothing that cannot be lost: the database stays
the truth (see ``budget.py``), and a Redis that cannot be reached degrades each part to its
one-process form (logged), never to an error for the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from openfusion.cluster.breaker import SharedBreaker
from openfusion.cluster.budget import HotBudgets
from openfusion.cluster.ratelimit import LocalLimiter, RateLimiter, RedisLimiter, retry_after
from openfusion.engine.policy import CircuitBreaker
from openfusion.settings import Settings
from openfusion.store.ledger import SpendLedger

__all__ = [
    "HotBudgets",
    "LocalLimiter",
    "RateLimiter",
    "RedisLimiter",
    "Shared",
    "SharedBreaker",
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
        redis = Redis.from_url(settings.redis_url)
        prefix = settings.redis_prefix
        retries = settings.retries
        return cls(
            RedisLimiter(redis, prefix),
            HotBudgets(redis, prefix, ledger),
            SharedBreaker(redis, prefix, retries.breaker_threshold, retries.breaker_cooldown),
            redis,
        )

    def start(self) -> None:
        if isinstance(self.breaker, SharedBreaker):
            self.breaker.start()

    async def aclose(self) -> None:
        if isinstance(self.breaker, SharedBreaker):
            await self.breaker.aclose()
        if self.redis is not None:
            await self.redis.aclose()
