"""``RedisGate``: after Redis fails, leave it alone for a few seconds.

A Redis that refuses connections fails fast, but one that does not answer at all (a network
partition, a host gone) makes every call wait for its socket timeout. Each part that uses Redis
asks the gate first: while it is shut, the part goes straight to its one-process fallback, so an
unreachable Redis costs one timeout per ``pause``, not one per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RedisGate"]

PAUSE = 5.0


class RedisGate:
    def __init__(self, pause: float = PAUSE, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause = pause
        self._clock = clock
        self._shut_until = float("-inf")

    def open(self) -> bool:
        """Whether to try Redis now."""
        return self._clock() >= self._shut_until

    def failed(self) -> None:
        """A call to Redis failed: go around it for ``pause`` seconds."""
        self._shut_until = self._clock() + self.pause
