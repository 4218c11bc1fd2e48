"""Fault injection over real HTTP: a scripted upstream on 127.0.0.1 (tests/upstream_mock.py)
serves panel ``mock/a``, ``mock/b``, ``mock/c`` and judge ``mock/judge`` through the
``openai_compat`` provider, and each case breaks one thing.

For every case: the run ends with the documented ``status`` / ``failure_reason``; the answers
that survived are the ones used; ``failed_models`` keeps the reason, status, tries and the
upstream's own words; no asyncio task and no upstream connection is left once the fusion is
closed; and the cost is exact: in integer nano-USD, ``usage.cost`` (and the sum of
``cost_details``) is the sum of the costs of the completions the upstream served in full, plus,
for a stream cut after its text went out, that text's cost estimated at the judge's price.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
import pytest
from helpers import ANALYSIS, eventually
from server_fixtures import config_dir, run_server
from upstream_mock import MockUpstream, Reply, in_turn

from openfusion import Fusion, FusionResult, ProviderRegistry, Settings
from openfusion.engine.policy import Caller
from openfusion.presets import load_preset
from openfusion.store import SpendLedger

QUESTION = "Who wrote Pride and Prejudice?"
ANSWERS = {"a": "Jane Austen.", "b": "Austen, in 1813.", "c": "It was Jane Austen."}
COSTS = {"a": 0.001, "b": 0.002, "c": 0.003}
ANALYSIS_COST = 0.0004
FUSED = "Jane Austen wrote Pride and Prejudice; it was published in 1813."
SYNTHESIS_COST = 0.0005
PANEL = ("a", "b", "c")
FAST = {"connect": 1.0, "read": 0.5, "total": 1.0}
"""Timeouts for the table: the hang case times out after 0.5 s per try."""
PATIENT = {"connect": 1.0, "read": 30.0, "total": 60.0}


def nano(usd: float | None) -> int:
    """USD as integer nano-USD, so that sums compare exactly."""
    assert usd is not None, "cost unknown"
    return round(usd * 1_000_000_000)


def write_setup(
    base_url: str,
    *,
    timeouts: dict[str, float] = FAST,
    retries: str = "",
    policy: str = "",
) -> None:
    """config.toml with provider ``mock`` at ``base_url``, and preset ``faults``."""
    times = "\n".join(f"{k} = {v}" for k, v in timeouts.items())
    (config_dir() / "config.toml").write_text(
        'default_preset = "faults"\n\n'
        f'[providers.mock]\ntype = "openai_compat"\nbase_url = "{base_url}"\napi_key_env = ""\n\n'
        f"[timeouts]\n{times}\n\n"
        f"[retries]\nattempts = 2\nbase_delay = 0.01\nmax_retry_after = 2\n{retries}\n"
    )
    panel = ", ".join(f'{{ model = "mock/{m}" }}' for m in PANEL)
    (config_dir() / "presets" / "faults.toml").write_text(
        f'judge = "mock/judge"\npanel = [{panel}]\n{policy}\n'
    )
    (config_dir() / "prices.toml").write_text(JUDGE_PRICE)


JUDGE_PRICE = '["mock/judge"]\nprompt = 1.0\ncompletion = 2.0\n'
"""USD per million tokens: what a cut synthesis stream is estimated at (the rest report cost)."""


Script = Reply | tuple[Reply, ...]
"""One reply for every request to a model, or replies in turn (the last one then repeats)."""


def source(script: Script) -> Callable[[Any], Reply]:
    return in_turn(*script) if isinstance(script, tuple) else in_turn(script)


def answer(member: str) -> Reply:
    return Reply(ANSWERS[member], cost=COSTS[member])


def script_upstream(
    up: MockUpstream,
    panel: dict[str, Script] | None = None,
    analysis: Script | None = None,
    synthesis: Script | None = None,
) -> None:
    """Panel members answer ``ANSWERS`` unless ``panel`` says otherwise; the judge answers the
    analysis call (it asks for ``response_format``) and the synthesis call (a stream)."""
    for member in PANEL:
        up.replies[member] = source((panel or {}).get(member, answer(member)))
    analyse = source(analysis or Reply(json.dumps(ANALYSIS), cost=ANALYSIS_COST))
    write = source(synthesis or Reply(FUSED, cost=SYNTHESIS_COST))
    up.replies["judge"] = lambda body: analyse(body) if "response_format" in body else write(body)


def new_tasks(before: set[asyncio.Task[Any]]) -> list[str]:
    current = asyncio.current_task()
    return sorted(
        repr(t.get_coro()) for t in asyncio.all_tasks() if t not in before and t is not current
    )


async def assert_nothing_left(up: MockUpstream, before: set[asyncio.Task[Any]]) -> None:
    """Once the fusion (and its providers) is closed: every connection to the upstream is
    closed, and no task started during the test is still there."""
    await eventually(lambda: up.open_connections == 0, "the upstream connections were closed")
    for _ in range(5):  # done-callbacks of what just closed
        await asyncio.sleep(0)
    assert new_tasks(before) == []


def estimate(case: Case | None, result: FusionResult) -> int:
    """The estimated cost of a cut synthesis stream (0 when nothing was cut), checked."""
    if case is None or not case.estimated:
        assert not result.usage.estimated
        return 0
    assert result.usage.estimated
    charged = nano(result.cost_details["synthesis"])
    assert charged > 0  # what was sent is charged, not 0
    return charged


def assert_exact_cost(result: FusionResult, up: MockUpstream, case: Case | None = None) -> None:
    """The run's cost is the sum of what the upstream billed, to the nano-dollar (and the
    estimate of a cut stream)."""
    billed = sum(nano(s.cost) for s in up.served) + estimate(case, result)
    assert nano(result.usage.cost) == billed
    assert sum(nano(c) for c in result.cost_details.values()) == billed
    for response in result.responses:
        assert nano(response.usage.cost) == nano(COSTS[response.name.removeprefix("mock/")])


@pytest.fixture
async def up() -> AsyncIterator[MockUpstream]:
    async with MockUpstream() as upstream:
        yield upstream


# -- the table -----------------------------------------------------------------------------------


class Failed(NamedTuple):
    member: str
    reason: str
    status: int | None
    tries: int
    message: str
    """Words the failure's message must contain (the upstream's own, when it gave any)."""


@dataclass(frozen=True)
class Case:
    id: str
    panel: dict[str, Script] = field(default_factory=dict)
    analysis: Script | None = None
    synthesis: Script | None = None
    status: str = "ok"
    failure_reason: str | None = None
    failure_message: str | None = None
    used: tuple[str, ...] = PANEL
    failed: tuple[Failed, ...] = ()
    calls: dict[str, int] = field(default_factory=dict)
    """Requests per model the upstream must have seen (default: 1 per member, 2 for the judge)."""
    billed: tuple[str, ...] | None = None
    """Models whose completions the upstream served in full (default: ``used`` + judge twice)."""
    content: str = FUSED
    analysed: bool = True
    disconnects: int = 0
    retry_gap: float | None = None
    """The member's second try came at least this many seconds after its first."""
    estimated: bool = False
    """The synthesis stream was cut after text went out: charged at an estimate."""

    def billed_models(self) -> list[str]:
        judge = ("judge", "judge") if self.used else ()
        return sorted(self.billed if self.billed is not None else (*self.used, *judge))


def error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status=status, error={"code": status, "message": message}, headers=headers)


CUT = Reply(FUSED, cost=SYNTHESIS_COST, chunk_size=4, cut_after=3)
"""The synthesis stream stops after three chunks: no finish_reason, no usage, no [DONE]."""
ALL = ("mock/a", "mock/b", "mock/c")

CASES = [
    Case(
        "429_retry_after_then_success",
        panel={"b": (error(429, "b: slow down", **{"Retry-After": "1"}), answer("b"))},
        calls={"b": 2},
        retry_gap=0.9,
    ),
    Case(
        "429_always",
        panel={"b": error(429, "b: rate limit exceeded for this key")},
        used=("a", "c"),
        failed=(Failed("b", "rate_limited", 429, 2, "b: rate limit exceeded for this key"),),
        calls={"b": 2},
    ),
    Case(
        "500_always",
        panel={"b": error(500, "b: internal error, the GPU caught fire")},
        used=("a", "c"),
        failed=(Failed("b", "upstream_error", 500, 2, "b: internal error, the GPU caught fire"),),
        calls={"b": 2},
    ),
    Case(
        "503_then_success",
        panel={"b": (error(503, "b: overloaded"), answer("b"))},
        calls={"b": 2},
    ),
    Case(
        "hang_past_the_timeout",
        panel={"b": Reply(delay=30)},
        used=("a", "c"),
        failed=(Failed("b", "timeout", None, 2, "no complete answer in time"),),
        calls={"b": 2},
        disconnects=2,
    ),
    Case(
        "connection_reset",
        panel={"b": Reply(reset=True)},
        used=("a", "c"),
        failed=(Failed("b", "connection_error", None, 2, "failed or was dropped"),),
        calls={"b": 2},
    ),
    Case(
        "malformed_json",
        panel={"b": Reply(body='{"id": "mock-1", "choices": [{"message": ')},
        used=("a", "c"),
        failed=(Failed("b", "invalid_response", None, 1, '"choices": [{"message": '),),
    ),
    Case(
        "empty_content",
        panel={"b": Reply("", cost=COSTS["b"])},
        used=("a", "c"),
        failed=(Failed("b", "empty_completion", None, 1, "empty answer"),),
        # The upstream billed the empty answer: it is part of the run's cost.
        billed=("a", "b", "c", "judge", "judge"),
    ),
    Case(
        "synthesis_stream_cut",
        synthesis=CUT,
        failure_reason="judge_upstream_error",
        failure_message="stream ended early",
        content=FUSED[:12],  # what had been sent stays: "Jane Austen "
        billed=("a", "b", "c", "judge"),
        estimated=True,
    ),
    Case(
        "synthesis_connection_dropped",
        synthesis=Reply(FUSED, cost=SYNTHESIS_COST, chunk_size=4, cut_after=3, reset=True),
        failure_reason="judge_upstream_error",
        failure_message="connection_error",
        content=FUSED[:12],  # no retry once text went out
        billed=("a", "b", "c", "judge"),
        estimated=True,
    ),
    Case(
        "synthesis_500",
        synthesis=error(500, "judge: cannot write now"),
        failure_reason="judge_upstream_error",
        failure_message="judge: cannot write now",
        content=ANSWERS["a"],  # the first panel answer stands in
        calls={"judge": 3},
        billed=("a", "b", "c", "judge"),
    ),
    Case(
        "analysis_500",
        analysis=error(500, "judge: analysis unavailable"),
        failure_reason="judge_upstream_error",
        failure_message="judge: analysis unavailable",
        analysed=False,
        calls={"judge": 3},
        billed=("a", "b", "c", "judge"),
    ),
    Case(
        "judge_not_json",
        analysis=Reply("The answers agree: it was Jane Austen.", cost=ANALYSIS_COST),
        failure_reason="judge_not_valid_json",
        analysed=False,
    ),
    Case(
        "judge_wrong_schema",
        analysis=Reply(json.dumps({"summary": "all agree", "score": 9}), cost=ANALYSIS_COST),
        failure_reason="judge_schema_mismatch",
        analysed=False,
    ),
    Case(
        "judge_empty_analysis",
        analysis=Reply("", cost=ANALYSIS_COST),
        failure_reason="judge_empty_completion",
        analysed=False,
    ),
    Case(
        "all_members_500",
        panel={m: error(500, f"{m}: down for maintenance") for m in PANEL},
        status="error",
        failure_reason="all_panels_failed",
        failure_message="b: down for maintenance",
        used=(),
        failed=tuple(
            Failed(m, "upstream_error", 500, 2, f"{m}: down for maintenance") for m in PANEL
        ),
        calls={"a": 2, "b": 2, "c": 2, "judge": 0},
        content="",
        analysed=False,
    ),
    Case(
        "all_members_429",
        panel={m: error(429, f"{m}: quota exhausted") for m in PANEL},
        status="error",
        failure_reason="rate_limited",
        failure_message="c: quota exhausted",
        used=(),
        failed=tuple(Failed(m, "rate_limited", 429, 2, f"{m}: quota exhausted") for m in PANEL),
        calls={"a": 2, "b": 2, "c": 2, "judge": 0},
        content="",
        analysed=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_fault(up: MockUpstream, case: Case) -> None:
    script_upstream(up, case.panel, case.analysis, case.synthesis)
    write_setup(up.base_url)
    before = asyncio.all_tasks()
    started = time.monotonic()
    async with Fusion.from_preset("faults") as fusion:
        result = await fusion.run(QUESTION)
        await eventually(lambda: up.in_flight == 0, "no request is left running upstream")
    elapsed = time.monotonic() - started
    await assert_nothing_left(up, before)

    assert (result.status, result.failure_reason) == (case.status, case.failure_reason)
    if case.failure_message is not None:
        assert case.failure_message in (result.failure_message or "")
    assert [r.name for r in result.responses] == [f"mock/{m}" for m in case.used]
    assert [r.content for r in result.responses] == [ANSWERS[m] for m in case.used]
    failed = [(f.name, f.reason, f.status, f.tries) for f in result.failed_models]
    assert failed == [(f"mock/{f.member}", f.reason, f.status, f.tries) for f in case.failed]
    for failure, expected in zip(result.failed_models, case.failed, strict=True):
        assert expected.message in failure.message
    assert result.content == case.content
    assert (result.analysis is not None) is case.analysed
    if case.analysed:
        assert result.analysis is not None
        assert result.analysis["consensus"] == ANALYSIS["consensus"]

    calls = {"a": 1, "b": 1, "c": 1, "judge": 2, **case.calls}
    assert {m: len(up.requests_for(m)) for m in calls} == calls
    assert sorted(s.model for s in up.served) == case.billed_models()
    assert_exact_cost(result, up, case)
    assert up.disconnects == case.disconnects
    assert elapsed < 5.0, f"took {elapsed:.2f}s"  # the 30 s hang did not hold the run
    if case.retry_gap is not None:
        first, second = up.requests_for("b")
        assert second.at - first.at >= case.retry_gap  # Retry-After, not the 0.01 s backoff


# -- stragglers and the circuit breaker over HTTP ----------------------------------------------


async def test_straggler_is_cancelled_and_its_connection_closed(up: MockUpstream) -> None:
    script_upstream(
        up,
        {
            "a": Reply(ANSWERS["a"], cost=COSTS["a"], delay=0.2),
            "b": Reply(ANSWERS["b"], cost=COSTS["b"], delay=0.3),
            "c": Reply(ANSWERS["c"], cost=COSTS["c"], delay=10),
        },
    )
    write_setup(
        up.base_url, timeouts=PATIENT, policy="[policy]\nmin_panel = 2\nstraggler_seconds = 0.5"
    )
    before = asyncio.all_tasks()
    started = time.monotonic()
    async with Fusion.from_preset("faults") as fusion:
        result = await fusion.run(QUESTION)
        elapsed = time.monotonic() - started
        await eventually(lambda: up.disconnects == 1, "the upstream saw the straggler leave")
    await assert_nothing_left(up, before)

    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert result.status == "ok" and result.failure_reason is None
    assert [r.name for r in result.responses] == ["mock/a", "mock/b"]
    assert [(f.name, f.reason) for f in result.failed_models] == [("mock/c", "deadline")]
    assert len(up.requests_for("c")) == 1
    assert sorted(s.model for s in up.served) == ["a", "b", "judge", "judge"]
    assert_exact_cost(result, up)


async def test_open_circuit_is_not_called_again_in_the_next_fusion(up: MockUpstream) -> None:
    script_upstream(up, {"b": error(500, "b: still broken")})
    write_setup(up.base_url, retries="breaker_threshold = 2\nbreaker_cooldown = 60")
    settings = Settings.load()
    preset = load_preset("faults", settings)
    registry = ProviderRegistry(settings)
    caller = Caller.from_settings(registry, settings)
    before = asyncio.all_tasks()
    try:
        first = await Fusion(preset, settings=settings, caller=caller).run(QUESTION)
        second = await Fusion(preset, settings=settings, caller=caller).run(QUESTION)
    finally:
        await registry.aclose()
    await assert_nothing_left(up, before)

    assert len(up.requests_for("b")) == 2  # two tries in the first fusion, none in the second
    (b1,) = first.failed_models
    assert (b1.reason, b1.status, b1.tries) == ("upstream_error", 500, 2)
    assert "b: still broken" in b1.message
    (b2,) = second.failed_models
    assert (b2.name, b2.reason, b2.tries) == ("mock/b", "circuit_open", 1)
    assert "circuit open after 2 failures" in b2.message
    for result in (first, second):
        assert result.status == "ok"
        assert [r.name for r in result.responses] == ["mock/a", "mock/c"]
    billed = sum(nano(s.cost) for s in up.served)
    assert nano(first.usage.cost) + nano(second.usage.cost) == billed


# -- through the server, with the spend ledger --------------------------------------------------

SERVER_IDS = (
    "empty_content",
    "503_then_success",
    "hang_past_the_timeout",
    "judge_not_json",
    "synthesis_stream_cut",
)
SERVER_CASES = [c for c in CASES if c.id in SERVER_IDS]


@pytest.mark.parametrize("case", SERVER_CASES, ids=[c.id for c in SERVER_CASES])
async def test_fault_through_the_server_is_in_the_ledger(up: MockUpstream, case: Case) -> None:
    script_upstream(up, case.panel, case.analysis, case.synthesis)
    write_setup(up.base_url)
    settings = Settings.load()
    with run_server(settings, ProviderRegistry(settings)) as server:
        idle = server.request_tasks()
        async with aiohttp.ClientSession() as session:
            body = {
                "model": "openfusion/faults",
                "messages": [{"role": "user", "content": QUESTION}],
            }
            async with session.post(server.base_url + "/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                generation_id = resp.headers["X-Generation-Id"]
                data = await resp.json()
        await eventually(
            lambda: set(server.request_tasks()) <= set(idle), "the server's tasks ended"
        )
    await eventually(lambda: up.open_connections == 0, "the upstream connections were closed")

    fusion = data["fusion"]
    assert (fusion["status"], fusion["failure_reason"]) == (case.status, case.failure_reason)
    assert [r["name"] for r in fusion["responses"]] == [f"mock/{m}" for m in case.used]
    assert [(f["name"], f["reason"]) for f in fusion["failed_models"]] == [
        (f"mock/{f.member}", f.reason) for f in case.failed
    ]
    assert data["choices"][0]["message"]["content"] == case.content

    async with SpendLedger(settings.database) as ledger:
        rows = await ledger.rows(generation_id)
    assert sorted(s.model for s in up.served) == case.billed_models()
    billed = sum(nano(s.cost) for s in up.served)
    assert data["usage"]["estimated"] is case.estimated
    if case.estimated:  # the cut synthesis: charged for what it sent, estimated
        billed += nano(data["usage"]["cost_details"]["synthesis"])
    assert sum(r.cost_nano or 0 for r in rows) == nano(data["usage"]["cost"]) == billed
    assert not any(r.unpriced for r in rows)
    # One row per call the upstream billed (an empty answer too; a cut stream, at its estimate).
    judge_stage = {False: "analysis", True: "synthesis"}
    billed_calls = [
        (judge_stage[s.stream] if s.model == "judge" else "panel", f"mock/{s.model}")
        for s in up.served
    ]
    if case.estimated:
        billed_calls.append(("synthesis", "mock/judge"))
    assert sorted((r.stage, r.model) for r in rows) == sorted(billed_calls)
