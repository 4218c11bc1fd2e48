"""How one logical call survives a flaky upstream: retries, fallbacks, a circuit breaker, and
the price of what it cost.

- Retries: on timeouts, dropped connections, 408, 429 and 5xx; exponential backoff with full
  jitter, or the upstream's ``Retry-After`` when it gave one (a longer wait than
  ``max_retry_after`` is not waited for: the next fallback is tried instead). Other 4xx are the
  request's fault and are not retried.
- Fallbacks: a slot lists models to try in order once its first is out of retries.
- Circuit breaker, per model id: after ``threshold`` retryable failures in a row, calls are refused
  at once for ``cooldown`` seconds; then one probe call is let through (half-open), and its
  outcome closes or re-opens the circuit. A probe that ends without telling (cancelled, refused
  by the budget, or failed with an error that says nothing of the model's health) is released:
  the next call probes instead. One breaker is shared by every run of a process.
- Redaction: an upstream's error text is where an echoed credential would enter (a proxy that
  quotes the ``Authorization`` header, a provider that prints the key masked); every
  ``ProviderError`` leaves here with the configured secrets scrubbed (``openfusion.redact``), so
  failure values, error bodies, stream error events, logs and records never see them.
- A timeout of our own clock while this process's event loop lagged (``LoopLag``: by
  ``OVERLOADED_LAG`` seconds or more during the call) is ours, not the upstream's: it is retried
  as any timeout but does not feed the breaker. Under thousands of calls in flight a lagging
  loop fires connect timeouts of calls that were answered; counted against the model, they
  opened its circuit and failed every request after them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

from openfusion.cost import PriceCatalog
from openfusion.engine.budget import (
    DEFAULT_MAX_TOKENS,
    MIN_OUTPUT_TOKENS,
    Budget,
    BudgetExceeded,
    prompt_token_bound,
)
from openfusion.engine.trace import CallObserver, CallRecord
from openfusion.errors import ConfigError, ProviderError, UpstreamTimeout
from openfusion.providers import Provider, ProviderRegistry
from openfusion.providers.base import honoured_part
from openfusion.redact import Redactor
from openfusion.settings import Settings
from openfusion.types import Chunk, Completion, CompletionRequest, ToolCall, Usage


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    """Tries per model, the first included."""
    base_delay: float = 0.5
    max_delay: float = 10.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int, error: ProviderError, rng: random.Random) -> float | None:
        """Seconds to wait before try ``attempt + 1``, or ``None`` to give up on this model."""
        if attempt >= self.attempts or not error.retryable:
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after else None
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


class CircuitOpenError(ProviderError):
    reason = "circuit_open"


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._opened_at: dict[str, float] = {}
        self._probing: set[str] = set()

    def state(self, key: str) -> str:
        if key not in self._opened_at:
            return "closed"
        if key in self._probing:
            return "half-open"
        waited = self._clock() - self._opened_at[key]
        return "half-open" if waited >= self.cooldown else "open"

    def check(self, key: str) -> bool:
        """Raise ``CircuitOpenError`` unless a call to ``key`` may go out now; True when this
        call is the half-open probe (its outcome decides, or it must be ``release``d)."""
        if key not in self._opened_at:
            return False
        waited = self._clock() - self._opened_at[key]
        if waited >= self.cooldown and key not in self._probing:
            self._probing.add(key)  # half-open: this call is the probe
            return True
        retry_in = max(0.0, self.cooldown - waited)
        raise CircuitOpenError(
            f"{key}: circuit open after {self._failures.get(key, 0)} failures in a row; "
            f"not calling it for another {retry_in:.0f}s",
            retry_after=retry_in,
        )

    def success(self, key: str) -> None:
        self._failures.pop(key, None)
        self._opened_at.pop(key, None)
        self._probing.discard(key)

    def failure(self, key: str) -> None:
        self._failures[key] = self._failures.get(key, 0) + 1
        if key in self._probing or self._failures[key] >= self.threshold:
            self._probing.discard(key)
            self._opened_at[key] = self._clock()

    def known(self) -> set[str]:
        """The models that have failed since their last success (closed, open or half-open)."""
        return set(self._failures) | set(self._opened_at)

    def release(self, key: str) -> None:
        """A probe that decided nothing: the circuit stays half-open, the next call probes."""
        self._probing.discard(key)


OVERLOADED_LAG = 0.5
"""Seconds late the event loop ran a timer, past which our own timeouts are not the upstream's."""


class LoopLag:
    """How late the running event loop runs its timers, sampled every ``interval`` seconds
    while a call is watched (no timer runs otherwise). A loop busy for a second fires the
    connect timeout of a call whose answer sat unread in its socket."""

    def __init__(self, interval: float = 0.05, keep: float = 900.0) -> None:
        self.interval = interval
        self._samples: deque[tuple[float, float]] = deque(maxlen=int(keep / interval))
        self._watching = 0
        self._ticking: asyncio.AbstractEventLoop | None = None

    def watch(self) -> float:
        """Sample from now until the matching ``unwatch``; returns the loop's time now. (Two
        calls, not a context manager: this is on every upstream call's path.)"""
        loop = asyncio.get_running_loop()
        self._watching += 1
        if self._ticking is not loop:  # not yet, or a loop that has gone (tests run several)
            self._ticking = loop
            loop.call_later(self.interval, self._tick, loop, loop.time() + self.interval)
        return loop.time()

    def unwatch(self) -> None:
        self._watching -= 1

    def worst_since(self, since: float) -> float:
        """The most a timer ran late since ``since`` (the loop's time), 0 if never."""
        worst = 0.0
        for when, late in reversed(self._samples):
            if when < since:
                break
            worst = max(worst, late)
        return worst

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        self._samples.append((now, now - due))
        if self._watching > 0 and self._ticking is loop:
            loop.call_later(self.interval, self._tick, loop, now + self.interval)
        elif self._ticking is loop:
            self._ticking = None


@dataclass(frozen=True, slots=True)
class Call:
    model: str
    """The model id that answered (a fallback, maybe)."""
    completion: Completion


class Caller:
    """Makes calls through the registry with retries, fallbacks, the breaker, pricing and the
    request's budget."""

    @classmethod
    def from_settings(
        cls,
        registry: ProviderRegistry,
        settings: Settings,
        *,
        breaker: CircuitBreaker | None = None,
    ) -> Caller:
        """``breaker``: one shared beyond this caller (the server's, maybe through Redis);
        default: a breaker of its own, configured by ``[retries]``."""
        r = settings.retries
        return cls(
            registry,
            PriceCatalog.load(settings.config_dir, settings.cache_dir),
            policy=RetryPolicy(r.attempts, r.base_delay, r.max_delay, r.max_retry_after),
            breaker=breaker or CircuitBreaker(r.breaker_threshold, r.breaker_cooldown),
            unpriced_call_usd=settings.budget.unpriced_call_usd,
            redact=Redactor.from_settings(settings),
        )

    def __init__(
        self,
        registry: ProviderRegistry,
        prices: PriceCatalog,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        unpriced_call_usd: float | None = None,
        redact: Redactor | None = None,
        lag: LoopLag | None = None,
    ) -> None:
        self.registry = registry
        self.unpriced_call_usd = unpriced_call_usd
        """What a call of a model without a price is charged under a budget (``None``: such
        calls are refused under a budget, their cost could not be bounded)."""
        self.redact = redact or Redactor()
        self.prices = prices
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.lag = lag or LoopLag()
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def complete(
        self,
        models: Sequence[str],
        request: CompletionRequest,
        budget: Budget | None = None,
        *,
        observe: CallObserver | None = None,
    ) -> Call:
        """The first model (in order) that answers, each tried per the retry policy.
        ``observe`` gets the call's ``CallRecord`` when it ends (answered, failed, cancelled)."""
        errors: list[ProviderError] = []
        started = time.monotonic()
        call: Call | None = None
        error: ProviderError | None = None
        try:
            call = await self._complete(models, request, budget, errors)
            return call
        except ProviderError as exc:
            error = exc
            raise
        finally:
            if observe is not None:
                model, reply = (call.model, call.completion) if call else (None, None)
                observe(_record(models, request, model, reply, error, len(errors), started))

    async def _complete(
        self,
        models: Sequence[str],
        request: CompletionRequest,
        budget: Budget | None,
        errors: list[ProviderError],
    ) -> Call:
        for model_id in models:
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with self._slot(model_id, request, budget) as (provider, call, bill):
                        completion = await provider.complete(honoured_part(provider, call))
                        usage = bill(completion.usage)
                except ProviderError as exc:
                    errors.append(exc)
                    if await self._retry(model_id, attempt, exc):
                        continue
                    break
                return Call(model_id, dataclasses.replace(completion, usage=usage))
        raise _gave_up(models, errors)

    async def stream(
        self,
        models: Sequence[str],
        request: CompletionRequest,
        budget: Budget | None = None,
        *,
        observe: CallObserver | None = None,
    ) -> AsyncIterator[Chunk]:
        """Like ``complete``, streamed. Once text has gone out, a failure is final, and the
        error carries (as ``usage``) what the sent text is estimated to have cost."""
        errors: list[ProviderError] = []
        started = time.monotonic()
        answered: list[str] = []
        parts: list[str] = []
        calls: list[ToolCall] = []
        usage: Usage | None = None
        reply: Completion | None = None
        error: ProviderError | None = None
        try:
            async with aclosing(self._stream(models, request, budget, errors, answered)) as chunks:
                async for chunk in chunks:
                    parts.append(chunk.delta)
                    calls.extend(chunk.tool_calls)
                    usage = chunk.usage or usage
                    yield chunk
            usage = usage or Usage(cost=None, reported=False)
            reply = Completion("".join(parts), usage, answered[-1], tool_calls=tuple(calls))
        except ProviderError as exc:
            error = exc
            raise
        finally:
            if observe is not None:
                model = reply.model if reply else None
                observe(_record(models, request, model, reply, error, len(errors), started))

    async def _stream(
        self,
        models: Sequence[str],
        request: CompletionRequest,
        budget: Budget | None,
        errors: list[ProviderError],
        answered: list[str],
    ) -> AsyncGenerator[Chunk, None]:
        prompt_chars = sum(len(m.content) for m in request.messages)
        for model_id in models:
            attempt = 0
            while True:
                attempt += 1
                sent: list[str] = []
                try:
                    async with self._slot(model_id, request, budget) as (provider, call, bill):
                        answered.append(model_id)
                        try:
                            async for chunk in provider.stream(honoured_part(provider, call)):
                                if chunk.delta:
                                    sent.append(chunk.delta)
                                if chunk.usage is not None:
                                    chunk = dataclasses.replace(chunk, usage=bill(chunk.usage))
                                yield chunk
                        except ProviderError as exc:
                            if sent:  # billed upstream for what it sent, though it never said
                                text = "".join(sent)
                                exc.usage = self.prices.estimated(model_id, prompt_chars, text)
                            raise
                except ProviderError as exc:
                    errors.append(exc)
                    if sent:
                        if exc.retryable and not exc.ours:
                            self.breaker.failure(model_id)
                        raise
                    if await self._retry(model_id, attempt, exc):
                        continue
                    break
                return
        raise _gave_up(models, errors)

    @asynccontextmanager
    async def _slot(
        self, model_id: str, request: CompletionRequest, budget: Budget | None
    ) -> AsyncIterator[tuple[Provider, CompletionRequest, Callable[[Usage], Usage]]]:
        """Resolve, pass the breaker, reserve the budget; yields the provider, the call to send
        it (under a budget, with the ``max_tokens`` the budget can pay) and a function that
        prices usage.

        The reservation is settled whatever happens: by the priced cost, or by the reserved
        worst case when the call ended without a known cost (failed or cancelled mid-way).
        """
        try:
            provider, name = self.registry.resolve(model_id)
        except ConfigError as exc:  # a failure of this slot, not of the whole run
            raise ProviderError(str(exc), reason="config_error") from exc
        probe = self.breaker.check(model_id)
        call = dataclasses.replace(request, model=name)
        reservation, charge = 0.0, None
        if budget is not None:
            try:
                call, reservation, charge = self._admit(model_id, call, budget)
            except BudgetExceeded:
                if probe:
                    self.breaker.release(model_id)
                raise
        billed: list[Usage] = []

        def bill(usage: Usage) -> Usage:
            priced = self.prices.priced(model_id, usage)
            if priced.cost is None and charge is not None:  # unpriced, at the stated charge
                priced = dataclasses.replace(priced, cost=charge)
            billed.append(priced)
            return priced

        started = self.lag.watch()
        try:
            try:
                yield provider, call, bill
            except UpstreamTimeout as exc:
                exc.ours = self.lag.worst_since(started) >= OVERLOADED_LAG
                raise
            finally:
                self.lag.unwatch()
        except ProviderError as exc:
            exc.message = self.redact(exc.message)
            exc.args = (exc.message,)
            if probe and (not exc.retryable or exc.ours):  # says nothing of the model's health
                self.breaker.release(model_id)
            if budget is not None:  # upstreams bill failed calls only for text they sent
                budget.settle(reservation, exc.usage.cost if exc.usage else 0.0)
            raise
        except BaseException:
            if probe:  # cancelled: it never found out whether the model is back
                self.breaker.release(model_id)
            if budget is not None:
                budget.settle(reservation, None)
            raise
        else:
            self.breaker.success(model_id)
            if budget is not None:
                budget.settle(reservation, billed[-1].cost if billed else None)

    def _admit(
        self, model_id: str, call: CompletionRequest, budget: Budget
    ) -> tuple[CompletionRequest, float, float | None]:
        """Reserve the worst case of ``call``: returns the call as it may go out (its
        ``max_tokens`` cut to what the budget can pay), the reservation, and the flat charge
        of an unpriced model (else ``None``). ``BudgetExceeded`` when it does not fit."""
        price = self.prices.price(model_id)
        if price is None:
            charge = self.unpriced_call_usd
            return call, budget.reserve(model_id, charge), charge
        prompt = price.cost(Usage(prompt_tokens=prompt_token_bound(call)))
        per_token = max(price.completion, price.reasoning or 0.0)
        wanted = call.max_tokens or DEFAULT_MAX_TOKENS
        if not budget.fit_output:  # the call as asked for, or not at all
            return call, budget.reserve(model_id, prompt + wanted * per_token), None
        max_tokens = wanted
        if per_token > 0:
            affordable = (budget.remaining - prompt) // per_token
            max_tokens = int(min(wanted, max(affordable, 0)))
        if max_tokens < min(wanted, MIN_OUTPUT_TOKENS):
            raise budget.refuse(
                model_id,
                f"it could cost up to ${prompt + wanted * per_token:.6f} and "
                f"${max(budget.remaining, 0):.6f} of max_cost ${budget.limit:.6f} is left "
                f"(not enough for {min(wanted, MIN_OUTPUT_TOKENS)} tokens of answer)",
            )
        worst = prompt + max_tokens * per_token
        if max_tokens < wanted:  # cut to what is left: no float rounding may refuse it
            worst = min(worst, budget.remaining)
        reservation = budget.reserve(model_id, worst)
        return dataclasses.replace(call, max_tokens=max_tokens), reservation, None

    async def _retry(self, model_id: str, attempt: int, error: ProviderError) -> bool:
        """Record the failure; wait and return True if this model gets another try."""
        if isinstance(error, CircuitOpenError | BudgetExceeded):
            return False
        if error.retryable and not error.ours:
            self.breaker.failure(model_id)
        delay = self.policy.delay(attempt, error, self._rng)
        if delay is None:
            return False
        await self._sleep(delay)
        return True


def _record(
    models: Sequence[str],
    request: CompletionRequest,
    model: str | None,
    reply: Completion | None,
    error: ProviderError | None,
    failed_tries: int,
    started: float,
) -> CallRecord:
    """What ``observe`` gets: answered (``reply``), failed (``error``), or else cancelled."""
    return CallRecord(
        models=tuple(models),
        model=model,
        messages=request.messages,
        content=reply.content if reply else "",
        tool_calls=reply.tool_calls if reply else (),
        usage=reply.usage if reply else _failed_usage(error),
        tries=failed_tries + (error is None),
        error=error,
        cancelled=reply is None and error is None,
        started=started,
        ended=time.monotonic(),
    )


def _failed_usage(error: ProviderError | None) -> Usage:
    """A call without a reply: cancelled (unknown), failed (not billed), or cut after its text
    went out (billed: the error carries the estimate)."""
    if error is None:
        return Usage(cost=None)
    return error.usage or Usage(cost=0.0)


def _gave_up(models: Sequence[str], errors: list[ProviderError]) -> ProviderError:
    """The last error, as the upstream worded it, counting every try that came before it."""
    last = errors[-1]
    last.tries = len(errors)
    return last
