"""The circuit breaker's state shared through Redis: a model one replica finds down is
avoided by all.

``SharedBreaker`` is the engine's ``CircuitBreaker`` (same synchronous calls, same local
state: the engine never waits for Redis) plus two Redis hashes::

    <prefix>breaker:fails   model -> retryable failures in a row, counted by every replica
    <prefix>breaker:open    model -> when its circuit opened (ms, Redis's clock)

A failure adds to the shared count in the background, and the script that adds opens the
circuit for every replica once the count reaches the threshold; a success clears both (only
when there is something to clear, so a healthy model costs no Redis call). A background task
reads ``breaker:open`` every ``interval`` seconds and opens (or, when another replica closed
it, closes) the local circuits to match: a circuit opened anywhere is open here within about
``interval`` seconds, for the rest of its cooldown. After the cooldown each replica lets its own
half-open probe through (N replicas: up to N probes, not one). Without Redis, or while it cannot
be reached, each process keeps its own breaker as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from openfusion.cluster.gate import RedisGate
from openfusion.engine.policy import CircuitBreaker

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["SharedBreaker"]

log = logging.getLogger(__name__)

# KEYS: fails, open. ARGV: model, threshold. Opens the circuit at the threshold.
FAIL = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if n >= tonumber(ARGV[2]) then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], ARGV[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return n
"""

# KEYS: open. -> {now ms, model, opened ms, model, opened ms, ...}
READ = """
local t = redis.call('TIME')
local out = {tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))}
local open = redis.call('HGETALL', KEYS[1])
for i = 1, #open do out[#out + 1] = open[i] end
return out
"""


class SharedBreaker(CircuitBreaker):
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        threshold: int = 5,
        cooldown: float = 30.0,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        gate: RedisGate | None = None,
    ) -> None:
        super().__init__(threshold, cooldown, clock)
        self.redis = redis
        self.gate = gate or RedisGate()
        self.interval = interval
        self._fails_key = f"{prefix}breaker:fails"
        self._open_key = f"{prefix}breaker:open"
        self._fail = redis.register_script(FAIL)
        self._read = redis.register_script(READ)
        self._shared: set[str] = set()
        """Models with a failure count or an open circuit in Redis, as far as this process
        knows: a success of any other model needs no Redis call."""
        self._remote: set[str] = set()
        """Models whose local circuit was opened from Redis."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._sync is None:
            self._sync = asyncio.create_task(self._sync_loop(), name="openfusion-breaker")

    async def aclose(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def failure(self, key: str) -> None:
        super().failure(key)
        self._shared.add(key)
        self._spawn(self._fail(keys=[self._fails_key, self._open_key], args=[key, self.threshold]))

    def success(self, key: str) -> None:
        super().success(key)
        if key in self._shared:
            self._shared.discard(key)
            self._remote.discard(key)
            self._spawn(self._clear(key))

    async def _clear(self, key: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._fails_key, key)
            pipe.hdel(self._open_key, key)
            await pipe.execute()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        if not self.gate.open():
            work.close()
            return

        async def run() -> None:
            try:
                await work
            except RedisError as exc:
                self.gate.failed()
                log.warning("breaker: Redis unavailable (%s); this process decides alone", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def pull(self) -> None:
        """Match the local circuits to Redis's open ones (the sync loop's step)."""
        raw = await self._read(keys=[self._open_key])
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
        now_ms = int(values[0])
        opened = {values[i]: int(values[i + 1]) for i in range(1, len(values) - 1, 2)}
        local_now = self._clock()
        for model, at_ms in opened.items():
            age = max(0.0, (now_ms - at_ms) / 1000)
            self._shared.add(model)
            if age >= self.cooldown and model not in self._opened_at:
                continue  # expired before this process saw it: the next call probes anyway
            since = local_now - age
            if self._opened_at.get(model, float("-inf")) < since:
                self._opened_at[model] = since
                self._failures[model] = max(self._failures.get(model, 0), self.threshold)
                self._remote.add(model)
        for model in list(self._remote):
            if model not in opened:  # closed by a success elsewhere
                self._remote.discard(model)
                self._shared.discard(model)
                self._failures.pop(model, None)
                self._opened_at.pop(model, None)
                self._probing.discard(model)

    async def _sync_loop(self) -> None:
        while True:
            try:
                if self.gate.open():
                    await self.pull()
            except RedisError as exc:
                self.gate.failed()
                log.warning("breaker: cannot read Redis (%s); this process decides alone", exc)
            await asyncio.sleep(self.interval)
