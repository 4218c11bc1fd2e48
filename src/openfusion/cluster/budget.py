"""Budget reservations hot in Redis; the database stays the truth.

Without Redis a reservation is a locked check-and-insert in the database
(``SpendLedger.reserve``). With Redis, the check moves to one Lua script on a per-key hash
``<prefix>budget:<key id>`` = {limit, spent, reserved, epoch} (nano-USD), atomic across every
replica, and the database only gets a plain insert: no lock, no sums per request.

How it stays right (every step is safe in the direction of refusing, never of overspending):

1. **The row first.** ``reserve`` inserts the reservation's row in the database *before* the
   script counts it in Redis (a refused one is deleted again; a partly granted one, ``up_to``,
   is lowered). So whatever Redis has forgotten, the database has.
2. **Rebuilt from the database, often.** A key's hash is built from the database — limit, spend
   rows, live reservations (``SpendLedger.budget``) — when missing, and expires ``refresh``
   seconds after it was built (never extended), so it is rebuilt that often. The rebuild is
   reconciliation: drift (a release that never reached Redis, a crashed replica's holds, a
   budget changed with ``openfusion keys budget``) lasts at most ``refresh`` seconds. Each
   build has a new ``epoch``; only the first builder's hash is kept (``HSETNX`` semantics), and
   a build whose database read took longer than half of ``refresh`` is thrown away.
3. **Released into the state it was counted in.** ``release`` (after the run's end and spend
   are committed in the database) subtracts the hold and adds the charge only if the hash has
   the epoch the reservation was made in; a newer hash was built from the database and already
   holds the reservation or its spend.

A reservation counted twice (its row read by a rebuild and also counted by its script) only
holds more than needed until the next rebuild. **When Redis restarts** (or evicts the hashes)
nothing is lost: the next request on each key rebuilds its hash from the database, which has
every reservation and every spend. **When Redis cannot be reached**, reservations go through
the database's locked path (``SpendLedger.reserve``), which counts the rows of both paths;
the key's hash is dropped at the next successful use, since it missed those. The one gap: if
only *some* replicas lose Redis, the others' hashes do not see the holds those make in the
database until their next rebuild, so for up to ``refresh`` seconds a key can be held beyond
its budget by at most those holds.

Spend rows themselves are never in Redis: the run's end writes them in the database, in its
own transaction, as without Redis (``StoreRecorder.settle``).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from openfusion.cluster.gate import RedisGate
from openfusion.store.ledger import BudgetExhausted, Reservation, SpendLedger, to_nano

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DEFAULT_REFRESH", "HotBudgets", "budget_key"]

log = logging.getLogger(__name__)

DEFAULT_REFRESH = 30.0
NO_BUDGET = -1

# KEYS[1]: the key's hash. ARGV: wanted nano, up_to (0/1), counted (0: only look).
# -> {"miss"} | {"none"} | {"look"} | {"full", limit, spent, reserved} | {"ok", granted, epoch}
RESERVE = """
local state = redis.call('HMGET', KEYS[1], 'limit', 'spent', 'reserved', 'epoch')
if not state[1] then return {'miss'} end
local limit = tonumber(state[1])
if limit < 0 then return {'none'} end
if ARGV[3] == '0' then return {'look'} end
local spent, reserved = tonumber(state[2]), tonumber(state[3])
local wanted = tonumber(ARGV[1])
local remaining = limit - spent - reserved
local amount = wanted
if ARGV[2] == '1' and remaining < wanted then amount = remaining end
if remaining <= 0 or amount > remaining then
  return {'full', tostring(limit), tostring(spent), tostring(reserved)}
end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
return {'ok', tostring(amount), state[4]}
"""

# KEYS[1]: the key's hash. ARGV: limit, spent, reserved, epoch, ttl ms. 1 if built, else 0.
BUILD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'limit', ARGV[1], 'spent', ARGV[2], 'reserved', ARGV[3],
           'epoch', ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
"""

# KEYS[1]: the key's hash. ARGV: epoch, held nano, charged nano. 1 if applied, else 0.
RELEASE = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'spent', tonumber(ARGV[3]))
return 1
"""


def budget_key(prefix: str, key_id: str) -> str:
    """The Redis hash of a key's budget state."""
    return f"{prefix}budget:{key_id}"


class HotBudgets:
    """``reserve`` and ``release`` for the server's metering, through Redis (see the module)."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        ledger: SpendLedger,
        *,
        refresh: float = DEFAULT_REFRESH,
        gate: RedisGate | None = None,
    ) -> None:
        self.redis = redis
        self.gate = gate or RedisGate()
        self.prefix = prefix
        self.ledger = ledger
        self.refresh = refresh
        self._reserve = redis.register_script(RESERVE)
        self._build = redis.register_script(BUILD)
        self._release = redis.register_script(RELEASE)
        self._epochs: dict[str, str] = {}
        """Reservation id -> the epoch of the hash it was counted in (until released)."""
        self._missed: set[str] = set()
        """Keys reserved through the database while Redis was unreachable."""

    def _key(self, key_id: str) -> str:
        return budget_key(self.prefix, key_id)

    async def reserve(
        self, key_id: str, amount_usd: float, *, up_to: bool = False
    ) -> Reservation | None:
        """As ``SpendLedger.reserve``: ``None`` for a key without a budget, else the hold, or
        ``BudgetExhausted``."""
        wanted = to_nano(amount_usd)
        if wanted < 0:
            raise ValueError(f"cannot reserve a negative amount: {amount_usd!r}")
        if not self.gate.open():
            self._missed.add(key_id)
            return await self.ledger.reserve(key_id, amount_usd, up_to=up_to)
        try:
            if key_id in self._missed:
                await self.redis.delete(self._key(key_id))
                self._missed.discard(key_id)
            answer = await self._script(key_id, wanted, up_to, counted=False)
            if answer[0] == "none":
                return None
            held = await self.ledger.hold(key_id, wanted)
            try:
                answer = await self._script(key_id, wanted, up_to, counted=True)
            except BaseException:
                await self.ledger.resize(held.id, 0)
                raise
        except RedisError as exc:
            self.gate.failed()
            log.warning("budgets: Redis unavailable (%s); reserving in the database", exc)
            self._missed.add(key_id)
            return await self.ledger.reserve(key_id, amount_usd, up_to=up_to)
        if answer[0] == "ok":
            granted = int(answer[1])
            if granted != wanted:
                await self.ledger.resize(held.id, granted)
            self._epochs[held.id] = answer[2]
            return Reservation(held.id, key_id, granted)
        await self.ledger.resize(held.id, 0)
        if answer[0] == "none":  # the budget was removed between the two looks
            return None
        limit, spent, reserved = (int(v) for v in answer[1:4])
        raise BudgetExhausted(
            key_id,
            limit_nano=limit,
            spent_nano=spent,
            reserved_nano=reserved,
            wanted_nano=wanted,
            overshoot_nano=await self.ledger.overshoot(key_id),  # a refusal: one read more
        )

    async def release(self, reservation: Reservation, charged_nano: int) -> None:
        """The reservation was settled in the database (its row gone, its spend written):
        count that in the hash it was reserved in, if that hash still stands."""
        epoch = self._epochs.pop(reservation.id, None)
        if epoch is None:  # reserved in the database: nothing of it in Redis
            return
        if not self.gate.open():  # the hash holds too much until it is rebuilt: safe
            return
        try:
            await self._release(
                keys=[self._key(reservation.key_id)],
                args=[epoch, reservation.amount_nano, charged_nano],
            )
        except RedisError as exc:  # the hash holds too much until it is rebuilt: safe
            self.gate.failed()
            log.warning("budgets: could not release %s in Redis: %s", reservation.id, exc)

    def forget(self, reservation: Reservation) -> None:
        """Stop tracking a reservation that will not be released (its settle failed)."""
        self._epochs.pop(reservation.id, None)

    async def _script(self, key_id: str, wanted: int, up_to: bool, *, counted: bool) -> list[str]:
        args = [wanted, int(up_to), int(counted)]
        for _ in range(3):
            raw = await self._reserve(keys=[self._key(key_id)], args=args)
            answer = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
            if answer[0] != "miss":
                return answer
            await self._rebuild(key_id)
        raise RedisError(f"the budget of key {key_id} could not be built in Redis")

    async def _rebuild(self, key_id: str) -> None:
        began = time.monotonic()
        status = await self.ledger.budget(key_id)
        if time.monotonic() - began > self.refresh / 2:
            return  # too slow to be current: the next look reads again
        limit = NO_BUDGET if status.limit_nano is None else status.limit_nano
        args: list[int | str] = [limit, status.spent_nano, status.reserved_nano]
        args += [uuid.uuid4().hex, int(self.refresh * 1000)]
        await self._build(keys=[self._key(key_id)], args=args)
