"""Retries, fallbacks, the circuit breaker, the straggler deadline and request budgets."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import eventually

from openfusion import (
    CompletionRequest,
    Fusion,
    Message,
    PanelSlot,
    Preset,
    ProviderError,
    ProviderRegistry,
    Settings,
    UpstreamError,
    UpstreamTimeout,
)
from openfusion.cost import Price, PriceCatalog
from openfusion.engine.budget import Budget, BudgetExceeded
from openfusion.engine.policy import Caller, CircuitBreaker, CircuitOpenError, RetryPolicy
from openfusion.presets import PanelPolicy
from openfusion.providers.base import HONOURS_ALL
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.types import Chunk, Completion, Usage

ANALYSIS = (
    '{"consensus": [], "contradictions": [], "partial_coverage": [], '
    '"unique_insights": [], "blind_spots": []}'
)
REQUEST = CompletionRequest(model="", messages=(Message("user", "hi"),), max_tokens=100)


class Sleeps:
    """Records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def caller_for(
    script: dict[str, object],
    settings: Settings,
    *,
    attempts: int = 3,
    prices: dict[str, Price] | None = None,
    breaker: CircuitBreaker | None = None,
) -> tuple[Caller, ScriptedProvider, Sleeps]:
    provider = ScriptedProvider(script)  # type: ignore[arg-type]
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    sleeps = Sleeps()
    caller = Caller(
        registry,
        PriceCatalog(prices or {}),
        policy=RetryPolicy(attempts=attempts, base_delay=1.0, max_delay=4.0, max_retry_after=10),
        breaker=breaker,
        sleep=sleeps,
        rng=random.Random(0),
    )
    return caller, provider, sleeps


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (UpstreamError("slow down", status=429), True),
        (UpstreamError("bad gateway", status=502), True),
        (UpstreamError("timeout", status=408), True),
        (ProviderError("reset", reason="connection_error"), True),
        (ProviderError("slow", reason="timeout"), True),
        (UpstreamError("bad request", status=400), False),
        (UpstreamError("no credits", status=402), False),
        (UpstreamError("no such model", status=404), False),
        (ProviderError("not json", reason="invalid_response"), False),
    ],
)
def test_what_is_retried(error: ProviderError, retried: bool) -> None:
    delay = RetryPolicy().delay(1, error, random.Random(0))
    assert (delay is not None) is retried


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=4.0, max_retry_after=10)
    error = UpstreamError("x", status=503)
    rng = random.Random(1)
    caps = [1.0, 2.0, 4.0, 4.0]
    for attempt, cap in enumerate(caps, start=1):
        samples = [policy.delay(attempt, error, rng) for _ in range(200)]
        assert all(s is not None and 0 <= s <= cap for s in samples)
        assert max(s for s in samples if s is not None) > cap * 0.8  # full jitter spans the cap
    assert policy.delay(5, error, rng) is None  # out of attempts
    told = UpstreamError("x", status=429, retry_after=7)
    assert policy.delay(1, told, rng) == 7
    too_long = UpstreamError("x", status=429, retry_after=60)
    assert policy.delay(1, too_long, rng) is None  # go to the fallback instead of waiting


async def test_retries_then_answers(settings: Settings) -> None:
    steps = [Step(status=503, error="busy"), Step(status=429, error="later"), Step("ok")]
    caller, provider, sleeps = caller_for({"m": steps}, settings)
    call = await caller.complete(["s/m"], REQUEST)
    assert call.completion.content == "ok"
    assert len(provider.calls) == 3
    assert len(sleeps.waits) == 2


async def test_no_retry_on_a_client_error(settings: Settings) -> None:
    caller, provider, sleeps = caller_for({"m": Step(status=400, error="bad")}, settings)
    with pytest.raises(UpstreamError, match="bad"):
        await caller.complete(["s/m"], REQUEST)
    assert len(provider.calls) == 1
    assert sleeps.waits == []


async def test_fallbacks_in_order_keep_the_upstream_message(settings: Settings) -> None:
    script = {
        "a": Step(status=404, error="model a does not exist"),
        "b": Step(status=500, error="b is down"),
        "c": Step("c answers"),
    }
    caller, provider, _ = caller_for(script, settings)
    call = await caller.complete(["s/a", "s/b", "s/c"], REQUEST)
    assert (call.model, call.completion.content) == ("s/c", "c answers")
    assert [c.model for c in provider.calls] == ["a", "b", "b", "b", "c"]
    caller, _, _ = caller_for({"a": script["a"], "b": script["b"]}, settings)
    with pytest.raises(ProviderError) as info:
        await caller.complete(["s/a", "s/b"], REQUEST)
    assert info.value.message == "b is down"
    assert info.value.tries == 4


async def test_stream_retries_only_before_the_first_text(settings: Settings) -> None:
    caller, provider, _ = caller_for({"m": [Step(status=503), Step("streamed answer")]}, settings)
    text = "".join([c.delta async for c in caller.stream(["s/m"], REQUEST)])
    assert text == "streamed answer"
    assert len(provider.calls) == 2


# -- circuit breaker -----------------------------------------------------------------------------


def test_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0])
    breaker.failure("m")
    breaker.check("m")  # one failure: still closed
    breaker.failure("m")
    assert breaker.state("m") == "open"
    with pytest.raises(CircuitOpenError, match="circuit open"):
        breaker.check("m")
    now[0] = 10.0
    breaker.check("m")  # the probe goes through
    with pytest.raises(CircuitOpenError):
        breaker.check("m")  # ... alone
    breaker.failure("m")  # the probe failed: open again
    assert breaker.state("m") == "open"
    now[0] = 20.0
    breaker.check("m")
    breaker.success("m")
    assert breaker.state("m") == "closed"
    breaker.check("m")


async def test_open_circuit_skips_to_the_fallback_without_calling(settings: Settings) -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=60)
    script = {"dead": Step(status=503, error="down"), "alive": Step("fine")}
    caller, provider, _ = caller_for(script, settings, attempts=2, breaker=breaker)
    await caller.complete(["s/dead", "s/alive"], REQUEST)  # two failures open the circuit
    assert breaker.state("s/dead") == "open"
    provider.calls.clear()
    call = await caller.complete(["s/dead", "s/alive"], REQUEST)
    assert call.model == "s/alive"
    assert [c.model for c in provider.calls] == ["alive"]


class TimesOut:
    """Our clock fires on every call, after blocking the event loop for ``block`` seconds
    (as thousands of calls in flight do)."""

    supports_json_schema = True
    honours = HONOURS_ALL

    def __init__(self, block: float) -> None:
        self.block = block

    async def complete(self, request: CompletionRequest) -> Completion:
        await asyncio.sleep(0.12)  # the loop's lag sampler ticks meanwhile
        time.sleep(self.block)  # noqa: ASYNC251 - the point: a loop too busy to run its timers
        await asyncio.sleep(0.06)  # the tick that measures the lag runs before the timeout lands
        raise UpstreamTimeout("no complete answer in time")

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        raise NotImplementedError
        yield Chunk()


@pytest.mark.parametrize(("block", "opens"), [(0.0, True), (0.75, False)])
async def test_timeouts_while_our_loop_lagged_do_not_open_the_circuit(
    settings: Settings, block: float, opens: bool
) -> None:
    registry = ProviderRegistry(settings)
    registry.register("s", TimesOut(block))  # type: ignore[arg-type]
    breaker = CircuitBreaker(threshold=2, cooldown=60)
    caller = Caller(registry, PriceCatalog({}), policy=RetryPolicy(attempts=1), breaker=breaker)
    for _ in range(2):
        with pytest.raises(UpstreamTimeout) as failed:
            await caller.complete(["s/m"], REQUEST)
        assert failed.value.ours is not opens
    assert breaker.state("s/m") == ("open" if opens else "closed")


def opened(now: list[float]) -> CircuitBreaker:
    """A breaker on a clock the test turns: one failure opens it for 10 seconds."""
    return CircuitBreaker(threshold=1, cooldown=10, clock=lambda: now[0])


async def test_a_cancelled_half_open_probe_does_not_lock_the_model_out(
    settings: Settings,
) -> None:
    now = [0.0]
    breaker = opened(now)
    script = {"m": [Step(status=503, error="down"), Step("late", delay=60), Step("back")]}
    caller, provider, _ = caller_for(script, settings, attempts=1, breaker=breaker)
    with pytest.raises(ProviderError, match="down"):
        await caller.complete(["s/m"], REQUEST)
    assert breaker.state("s/m") == "open"
    now[0] = 10.0
    probe = asyncio.create_task(caller.complete(["s/m"], REQUEST))
    await eventually(lambda: len(provider.calls) == 2, "the probe went out (and hangs)")
    probe.cancel()  # a straggler deadline, a client gone
    with pytest.raises(asyncio.CancelledError):
        await probe
    call = await caller.complete(["s/m"], REQUEST)  # probes again, instead of being refused
    assert call.completion.content == "back"
    assert breaker.state("s/m") == "closed"


async def test_a_probe_refused_by_the_budget_is_released(settings: Settings) -> None:
    now = [0.0]
    breaker = opened(now)
    script = {"m": [Step(status=503, error="down"), Step("back")]}
    prices = {"s/m": Price(prompt=0.001, completion=0.001)}
    caller, provider, _ = caller_for(script, settings, attempts=1, breaker=breaker, prices=prices)
    with pytest.raises(ProviderError):
        await caller.complete(["s/m"], REQUEST)
    now[0] = 10.0
    with pytest.raises(BudgetExceeded):
        await caller.complete(["s/m"], REQUEST, Budget(limit=0.000001))
    assert len(provider.calls) == 1  # the refused probe never went out
    call = await caller.complete(["s/m"], REQUEST)
    assert call.completion.content == "back"


async def test_a_probe_failing_with_a_client_error_is_released(settings: Settings) -> None:
    now = [0.0]
    breaker = opened(now)
    script = {"m": [Step(status=503), Step(status=400, error="bad request"), Step("back")]}
    caller, _, _ = caller_for(script, settings, attempts=1, breaker=breaker)
    with pytest.raises(ProviderError):
        await caller.complete(["s/m"], REQUEST)
    now[0] = 10.0
    with pytest.raises(ProviderError, match="bad request"):  # says nothing of the model's health
        await caller.complete(["s/m"], REQUEST)
    assert breaker.state("s/m") == "half-open"
    assert (await caller.complete(["s/m"], REQUEST)).completion.content == "back"


# -- prices --------------------------------------------------------------------------------------


async def test_reported_cost_wins_and_the_catalog_fills_the_rest(settings: Settings) -> None:
    prices = {"s/priced": Price(prompt=1e-6, completion=2e-6, request=0.001)}
    script = {
        "reported": Step("a b c", cost=0.5),
        "priced": Step("a b c", cost=None),
        "unknown": Step("a b c", cost=None),
    }
    caller, _, _ = caller_for(script, settings, prices=prices)
    reported = await caller.complete(["s/reported"], REQUEST)
    assert reported.completion.usage.cost == 0.5
    priced = (await caller.complete(["s/priced"], REQUEST)).completion.usage
    assert priced.cost == pytest.approx(
        priced.prompt_tokens * 1e-6 + priced.completion_tokens * 2e-6 + 0.001
    )
    unknown = await caller.complete(["s/unknown"], REQUEST)
    assert unknown.completion.usage.cost is None


def test_reasoning_tokens_count_at_their_own_price() -> None:
    price = Price(prompt=1.0, completion=2.0, reasoning=5.0)
    usage = Usage(prompt_tokens=10, completion_tokens=30, reasoning_tokens=20)
    assert price.cost(usage) == 10 * 1.0 + 10 * 2.0 + 20 * 5.0
    assert Price(1.0, 2.0).cost(usage) == 10 + 30 * 2.0


def test_catalog_from_snapshot_sync_and_user_file(tmp_path: Path) -> None:
    from openfusion.cost import save_sync

    body = {
        "data": [
            {"id": "x/cheap", "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
            {"id": "x/variable", "pricing": {"prompt": "-1", "completion": "-1"}},
            {"id": "x/broken", "pricing": {"prompt": "n/a"}},
        ]
    }
    assert save_sync(tmp_path, body) == 1
    (tmp_path / "prices.toml").write_text('["openai/gpt-x"]\nprompt = 2.0\ncompletion = 8.0\n')
    catalog = PriceCatalog.load(tmp_path, tmp_path)
    assert catalog.price("openrouter/x/cheap") == Price(1e-6, 2e-6)
    assert catalog.price("openrouter/x/variable") is None
    assert catalog.price("openai/gpt-x") == Price(2e-6, 8e-6)
    assert catalog.price("local/gemma-3-270m") == Price(0.0, 0.0)
    assert catalog.price("openrouter/google/gemini-2.0-flash-001") is not None  # shipped
    assert catalog.price("nobody/knows") is None


# -- budgets -------------------------------------------------------------------------------------


async def test_calls_that_could_overrun_max_cost_are_not_started(settings: Settings) -> None:
    # Worst case: the prompt ("hi": at most 2 bytes + 16 tokens of overhead) + max_tokens 100,
    # at $1e-4 a token = $0.0118; a real call (3 tokens) costs $0.0003.
    prices = {"s/m": Price(prompt=1e-4, completion=1e-4)}
    caller, provider, _ = caller_for({"m": Step("a b", cost=None)}, settings, prices=prices)
    budget = Budget(limit=0.0125)
    await caller.complete(["s/m"], REQUEST, budget)  # $0.0125 left >= $0.0118
    await caller.complete(["s/m"], REQUEST, budget)  # $0.0122 left >= $0.0118
    await caller.complete(["s/m"], REQUEST, budget)  # $0.0119 left
    await caller.complete(["s/m"], REQUEST, budget)  # $0.0116 left: sent with max_tokens 98
    assert [c.max_tokens for c in provider.calls] == [100, 100, 100, 98]
    budget.spent = budget.limit - 0.0018 - 15e-4  # left: the prompt and 15 tokens of answer
    with pytest.raises(BudgetExceeded, match="could cost up to"):
        await caller.complete(["s/m"], REQUEST, budget)
    assert len(provider.calls) == 4
    assert budget.reserved == 0


async def test_unpriced_model_is_not_started_under_a_budget(settings: Settings) -> None:
    caller, provider, _ = caller_for({"m": Step("x")}, settings)
    with pytest.raises(BudgetExceeded, match="price is unknown"):
        await caller.complete(["s/m"], REQUEST, Budget(limit=10))
    assert provider.calls == []


async def test_fusion_under_max_cost_reports_what_it_refused(settings: Settings) -> None:
    prices = {f"s/{m}": Price(1e-5, 1e-5) for m in ("a", "b", "judge")}
    prices["s/pricey"] = Price(1.0, 1.0)
    script = {
        "a": Step("A.", cost=None),
        "b": Step("B.", cost=None),
        "pricey": Step("never", cost=None),
        "judge": [Step(ANALYSIS, cost=None), Step("Final.", cost=None)],
    }
    provider = ScriptedProvider(script)  # type: ignore[arg-type]
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    caller = Caller(registry, PriceCatalog(prices), policy=RetryPolicy(attempts=1))
    preset = Preset(
        "p",
        (PanelSlot("s/a"), PanelSlot("s/b"), PanelSlot("s/pricey")),
        judge="s/judge",
    )
    result = await Fusion(preset, settings=settings, caller=caller).run("q", max_cost=0.5)
    assert result.status == "ok"
    assert result.content == "Final."
    assert [(f.name, f.reason) for f in result.failed_models] == [("s/pricey", "budget")]
    assert result.budget is not None
    assert result.budget["refused"] == ["s/pricey"]
    assert result.budget["spent"] == pytest.approx(result.usage.cost)
    assert not any(c.model == "pricey" for c in provider.calls)


# -- straggler deadline --------------------------------------------------------------------------


class Slow:
    """Answers after a per-model delay; records cancellations (a closed upstream call)."""

    supports_json_schema = True
    honours = HONOURS_ALL

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.cancelled: list[str] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        try:
            await asyncio.sleep(self.delays[request.model])
        except asyncio.CancelledError:
            self.cancelled.append(request.model)
            raise
        content = ANALYSIS if request.json_schema else f"{request.model} answers"
        return Completion(content, Usage(cost=0.0), request.model)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        yield Chunk(delta="fused")
        yield Chunk(usage=Usage(cost=0.0), finish_reason="stop")

    async def aclose(self) -> None:
        return None


async def test_straggler_is_cancelled_after_the_quorum_deadline(settings: Settings) -> None:
    slow = Slow({"fast": 0.2, "medium": 0.3, "slow": 10.0, "judge": 0.0})
    registry = ProviderRegistry(settings)
    registry.register("t", slow)
    preset = Preset(
        "straggle",
        (PanelSlot("t/fast"), PanelSlot("t/medium"), PanelSlot("t/slow")),
        judge="t/judge",
        policy=PanelPolicy(min_panel=2, straggler_seconds=0.5),
    )
    started = time.monotonic()
    result = await Fusion(preset, settings=settings, registry=registry).run("q")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert [r.name for r in result.responses] == ["t/fast", "t/medium"]
    (late,) = result.failed_models
    assert (late.name, late.reason) == ("t/slow", "deadline")
    assert slow.cancelled == ["slow"]
    assert result.status == "ok"


async def test_straggler_factor_uses_the_median_latency(settings: Settings) -> None:
    slow = Slow({"a": 0.1, "b": 0.1, "c": 5.0, "judge": 0.0})
    registry = ProviderRegistry(settings)
    registry.register("t", slow)
    preset = Preset(
        "f",
        (PanelSlot("t/a"), PanelSlot("t/b"), PanelSlot("t/c")),
        judge="t/judge",
        policy=PanelPolicy(min_panel=2, straggler_factor=2.0),
    )
    result = await Fusion(preset, settings=settings, registry=registry).run("q")
    assert [f.reason for f in result.failed_models] == ["deadline"]
    assert result.latency_ms < 1500


async def test_quorum_not_met_is_a_failed_fusion(settings: Settings) -> None:
    script = {"a": Step("A."), "b": Step(status=500, error="b down"), "judge": Step(ANALYSIS)}
    provider = ScriptedProvider(script)  # type: ignore[arg-type]
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    preset = Preset(
        "q", (PanelSlot("s/a"), PanelSlot("s/b")), judge="s/judge", policy=PanelPolicy(min_panel=2)
    )
    result = await Fusion(preset, settings=settings, registry=registry).run("q")
    assert result.status == "error"
    assert result.failure_reason == "all_panels_failed"
    assert "b down" in (result.failure_message or "")
    assert not any(c.model == "judge" for c in provider.calls)


async def test_judge_fallback_takes_over(settings: Settings) -> None:
    script = {
        "a": Step("A."),
        "judge": Step(status=503, error="judge down"),
        "backup": [Step(ANALYSIS), Step("Backup wrote this.")],
    }
    provider = ScriptedProvider(script)  # type: ignore[arg-type]
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    preset = Preset("j", (PanelSlot("s/a"),), judge="s/judge", judge_fallbacks=("s/backup",))
    result = await Fusion(preset, settings=settings, registry=registry).run("q")
    assert result.failure_reason is None
    assert result.analysis is not None
    assert result.content == "Backup wrote this."


async def test_a_budget_too_small_for_any_member_is_insufficient_credits(
    settings: Settings,
) -> None:
    script = {"a": Step("A.", cost=None), "judge": Step(ANALYSIS, cost=None)}
    provider = ScriptedProvider(script)  # type: ignore[arg-type]
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    caller = Caller(registry, PriceCatalog({"s/a": Price(1.0, 1.0)}), policy=RetryPolicy(1))
    preset = Preset("b", (PanelSlot("s/a"),), judge="s/judge")
    result = await Fusion(preset, settings=settings, caller=caller).run("q", max_cost=0.01)
    assert result.status == "error"
    assert result.failure_reason == "insufficient_credits"  # a 402 over HTTP
    assert provider.calls == []
