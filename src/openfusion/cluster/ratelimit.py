"""Per-key rate limits: requests and tokens per minute, over a sliding window of 60 s.

A request is admitted when, over the last minute, its key sent fewer than ``rpm`` requests and
its runs used fewer than ``tpm`` tokens; it is then counted. Its tokens are only known when it
ends, so they are charged then (``charge``): a key at the edge of its ``tpm`` may go over by one
request's tokens, never by more. A refusal says how long until the window admits the request
(the ``Retry-After`` of the 429).

Two interchangeable limiters:

- ``LocalLimiter``: in this process's memory (the default; with ``--workers N`` each worker
  counts alone, so a key gets up to N times its limit).
- ``RedisLimiter``: one sorted set per key and measure in Redis, checked and counted by one Lua
  script (atomic on the Redis server, so every replica sharing it sees one window; Redis's own
  clock, so the replicas' clocks do not matter). If Redis cannot be reached, it falls back to a
  ``LocalLimiter`` for that request (logged) rather than refusing or opening every key.

Keys without limits never reach either: the server only calls ``admit`` for a key with ``rpm``
or ``tpm`` set, and ``charge`` for one with ``tpm``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from redis.exceptions import RedisError

from openfusion.cluster.gate import RedisGate

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["WINDOW", "LocalLimiter", "RateLimiter", "RedisLimiter"]

log = logging.getLogger(__name__)

WINDOW = 60.0
"""Seconds of the sliding window."""


class RateLimiter(Protocol):
    async def admit(self, key_id: str, rpm: int | None, tpm: int | None) -> float | None:
        """``None`` when the request is admitted (and counted); else the seconds to wait."""
        ...

    async def charge(self, key_id: str, tokens: int) -> None:
        """Count ``tokens`` used by one of the key's requests, now."""
        ...


class LocalLimiter:
    """The sliding window in this process: per key, the times of its requests and of its
    token charges (bounded: entries older than the window are dropped on each look)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    async def admit(self, key_id: str, rpm: int | None, tpm: int | None) -> float | None:
        now = self._clock()
        since = now - WINDOW
        requests = self._requests.setdefault(key_id, deque())
        while requests and requests[0] <= since:
            requests.popleft()
        charges = self._tokens.setdefault(key_id, deque())
        while charges and charges[0][0] <= since:
            charges.popleft()
        wait = 0.0
        if rpm and len(requests) >= rpm:
            wait = requests[len(requests) - rpm] + WINDOW - now
        if tpm:
            used = sum(tokens for _, tokens in charges)
            for at, tokens in charges:
                if used < tpm:
                    break
                used -= tokens
                wait = max(wait, at + WINDOW - now)
        if wait > 0:
            return wait
        requests.append(now)
        return None

    async def charge(self, key_id: str, tokens: int) -> None:
        if tokens > 0:
            self._tokens.setdefault(key_id, deque()).append((self._clock(), tokens))


# KEYS: the key's requests, its token charges (sorted sets scored by ms; a charge's member is
# "<id>:<tokens>"). ARGV: window ms, rpm (0: none), tpm (0: none), this request's id.
# Returns 0 when admitted (and counted), else the ms to wait.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local wait = 0
if rpm > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    wait = tonumber(oldest[2]) + window - now
  end
end
if tpm > 0 then
  local charges = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #charges, 2 do
    used = used + tonumber(string.match(charges[i], ':(%d+)$'))
  end
  for i = 1, #charges, 2 do
    if used < tpm then break end
    used = used - tonumber(string.match(charges[i], ':(%d+)$'))
    wait = math.max(wait, tonumber(charges[i + 1]) + window - now)
  end
end
if wait > 0 then return wait end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""

CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 0
"""


class RedisLimiter:
    """The sliding window in Redis, shared by every replica using the same Redis and
    ``prefix``."""

    def __init__(self, redis: Redis, prefix: str, gate: RedisGate | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.gate = gate or RedisGate()
        self._admit = redis.register_script(ADMIT)
        self._charge = redis.register_script(CHARGE)
        self._fallback = LocalLimiter()

    def _keys(self, key_id: str) -> list[str]:
        return [f"{self.prefix}rl:{key_id}:req", f"{self.prefix}rl:{key_id}:tok"]

    async def admit(self, key_id: str, rpm: int | None, tpm: int | None) -> float | None:
        window_ms = int(WINDOW * 1000)
        if not self.gate.open():
            return await self._fallback.admit(key_id, rpm, tpm)
        try:
            wait = await self._admit(
                keys=self._keys(key_id), args=[window_ms, rpm or 0, tpm or 0, uuid.uuid4().hex]
            )
        except RedisError as exc:
            self.gate.failed()
            log.warning("rate limits: Redis unavailable (%s); limiting in this process", exc)
            return await self._fallback.admit(key_id, rpm, tpm)
        return None if int(wait) <= 0 else int(wait) / 1000

    async def charge(self, key_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        window_ms = int(WINDOW * 1000)
        member = f"{uuid.uuid4().hex}:{tokens}"
        if not self.gate.open():
            await self._fallback.charge(key_id, tokens)
            return
        try:
            await self._charge(keys=self._keys(key_id)[1:], args=[window_ms, member])
        except RedisError as exc:
            self.gate.failed()
            log.warning("rate limits: Redis unavailable (%s); tokens counted here only", exc)
            await self._fallback.charge(key_id, tokens)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
