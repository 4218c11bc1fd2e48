"""The caller tier from the library (``Fusion.call``), the CLI (``ask --caller``) and the
server's ledger: a caller model decides whether to fuse, on scripted models."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from helpers import ANALYSIS
from server_fixtures import RunningServer, setup_demo

from openfusion import (
    AnswerDelta,
    Done,
    Fusion,
    FusionCallEvent,
    PanelSlot,
    Preset,
    ProviderRegistry,
    Settings,
    StageEvent,
    ToolSpec,
)
from openfusion.cli import main
from openfusion.cost import Price, PriceCatalog
from openfusion.engine.policy import Caller, RetryPolicy
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.store import SpendLedger
from openfusion.types import CompletionRequest, ToolCall

QUESTION = "Who wrote Pride and Prejudice?"
FUSE = ToolCall("c1", "fusion", json.dumps({"prompt": "Who wrote P&P, really?"}))
ANSWER = "The panel agrees: Jane Austen."
WEATHER = ToolSpec("get_weather", "The weather in a city.", {"type": "object"})


def judge(request: CompletionRequest) -> Step:
    return Step(json.dumps(ANALYSIS), cost=0.0004) if request.json_schema else Step("unused")


def panel(**extra: Any) -> dict[str, Any]:
    return {
        "a": Step("Jane Austen.", cost=0.001),
        "b": Step("Austen, in 1813.", cost=0.002),
        "judge": judge,
        **extra,
    }


def tier(
    settings: Settings, script: dict[str, Any], prices: dict[str, Price] | None = None
) -> tuple[Fusion, ScriptedProvider]:
    """A fusion of ``s/a`` and ``s/b`` judged by ``s/judge``; ``prices`` for budgets."""
    provider = ScriptedProvider(script)
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    caller = Caller(registry, PriceCatalog(prices or {}), policy=RetryPolicy(attempts=1))
    preset = Preset("t", (PanelSlot("s/a"), PanelSlot("s/b")), judge="s/judge")
    return Fusion(preset, settings=settings, caller=caller), provider


def calls_of(provider: ScriptedProvider, model: str) -> list[CompletionRequest]:
    return [c for c in provider.calls if c.model == model]


async def test_the_library_runs_the_caller_tier(settings: Settings) -> None:
    caller = [Step("", tool_calls=(FUSE,), cost=0.01), Step(ANSWER, cost=0.02)]
    fusion, provider = tier(settings, panel(caller=caller))
    events = [e async for e in fusion.call_stream("s/caller", QUESTION)]

    *_, done = events
    assert isinstance(done, Done)
    result = done.result
    assert result.content == ANSWER
    assert (result.caller, result.fused, result.status) == ("s/caller", True, "ok")
    assert result.analysis is not None and set(result.analysis) == set(ANALYSIS)
    assert [r.name for r in result.responses] == ["s/a", "s/b"]
    assert result.cost_details == {
        "caller": pytest.approx(0.03),
        "panel": pytest.approx(0.003),
        "analysis": pytest.approx(0.0004),
    }
    assert result.usage.cost == pytest.approx(0.0334)

    # The panel answered the caller's prompt; the judge analysed once and wrote nothing.
    assert all(c.messages[-1].content == "Who wrote P&P, really?" for c in calls_of(provider, "a"))
    assert [c.json_schema is not None for c in calls_of(provider, "judge")] == [True]
    first, final = calls_of(provider, "caller")
    assert [t.name for t in first.tools] == ["fusion"]
    assert first.tool_choice == "auto"
    assert final.tool_choice == "none"  # it has its analysis: now it answers
    tool = json.loads(final.messages[-1].content)
    assert set(tool["analysis"]) == set(ANALYSIS)
    assert {r["model"] for r in tool["responses"]} == {"s/a", "s/b"}

    kinds = [type(e).__name__ for e in events]
    calls = [e for e in events if isinstance(e, FusionCallEvent)]
    assert [(c.state, c.call_id, c.prompt) for c in calls] == [
        ("running", "c1", "Who wrote P&P, really?"),
        ("done", "c1", "Who wrote P&P, really?"),
    ]
    assert kinds.index("FusionCallEvent") < kinds.index("MemberEvent")
    assert kinds.index("AnswerDelta") > len(kinds) - kinds[::-1].index("FusionCallEvent") - 1
    turns = [e for e in events if isinstance(e, StageEvent) and e.stage == "caller"]
    assert [(t.state, t.usage.cost if t.usage else None) for t in turns] == [
        ("running", None),
        ("done", 0.01),
        ("running", None),
        ("done", 0.02),
    ]
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == ANSWER


async def test_a_caller_that_answers_alone_runs_no_panel(settings: Settings) -> None:
    fusion, provider = tier(settings, panel(caller=Step("I know: Jane Austen.", cost=0.01)))
    result = await fusion.call("s/caller", QUESTION)
    assert (result.content, result.fused, result.analysis) == ("I know: Jane Austen.", False, None)
    assert result.cost_details == {"caller": 0.01}
    assert [c.model for c in provider.calls] == ["caller"]


async def test_the_callers_functions_stay_beside_the_fusion_tool(settings: Settings) -> None:
    weather = ToolCall("w1", "get_weather", '{"city": "Paris"}')
    fusion, provider = tier(settings, panel(caller=Step("", tool_calls=(weather,))))
    result = await fusion.call("s/caller", QUESTION, functions=[WEATHER])
    assert result.tool_calls == (weather,)  # for the client to run
    assert (result.finish_reason, result.fused, result.content) == ("tool_calls", False, "")
    (request,) = provider.calls
    assert [t.name for t in request.tools] == ["fusion", "get_weather"]


async def test_a_function_named_in_tool_choice_is_forced(settings: Settings) -> None:
    weather = ToolCall("w1", "get_weather", "{}")
    fusion, provider = tier(settings, panel(caller=Step("", tool_calls=(weather,))))
    await fusion.call("s/caller", QUESTION, functions=[WEATHER], tool_choice="get_weather")
    assert provider.calls[0].tool_choice == {
        "type": "function",
        "function": {"name": "get_weather"},
    }


async def test_models_after_the_first_are_the_callers_fallbacks(settings: Settings) -> None:
    script = panel(down=Step(status=503, error="caller overloaded"), caller=Step("Austen."))
    fusion, provider = tier(settings, script)
    result = await fusion.call(["s/down", "s/caller"], QUESTION)
    assert (result.content, result.caller) == ("Austen.", "s/caller")
    assert [c.model for c in provider.calls] == ["down", "caller"]


async def test_a_forced_fusion_runs_even_if_the_caller_cannot_call_tools(
    settings: Settings,
) -> None:
    caller = [Step("I would rather just answer."), Step(ANSWER)]
    fusion, provider = tier(settings, panel(caller=caller))
    events = [e async for e in fusion.call_stream("s/caller", QUESTION, tool_choice="fusion")]
    result = events[-1].result  # type: ignore[union-attr]
    assert result.fused and result.content == ANSWER
    # The first turn's text never reached the client: only the answer after the fusion did.
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == ANSWER
    assert all(c.messages[-1].content == QUESTION for c in calls_of(provider, "a"))


async def test_the_callers_calls_count_against_max_cost(settings: Settings) -> None:
    prices = {f"s/{m}": Price(0.000001, 0.000001) for m in ("caller", "a", "b", "judge")}
    caller = [Step("", tool_calls=(FUSE,), cost=None), Step(ANSWER, cost=None)]
    fusion, provider = tier(settings, panel(caller=caller), prices)

    result = await fusion.call("s/caller", QUESTION, max_cost=0.0001)  # not even its prompt
    assert provider.calls == []
    assert (result.status, result.failure_reason) == ("error", "insufficient_credits")
    assert result.caller_failure is not None and result.caller_failure.reason == "budget"
    assert result.budget is not None and result.budget["refused"] == ["s/caller"]

    result = await fusion.call("s/caller", QUESTION, max_cost=1.0)
    assert result.content == ANSWER
    assert result.budget is not None
    assert result.budget["spent"] == pytest.approx(result.usage.cost)  # the caller's too
    assert result.cost_details["caller"] is not None and result.cost_details["caller"] > 0


async def test_a_fusion_invoked_past_the_cap_ends_capped(settings: Settings) -> None:
    again = ToolCall("c2", "fusion", json.dumps({"prompt": "And once more?"}))
    caller = [Step("", tool_calls=(FUSE,)), Step("", tool_calls=(again,)), Step("Austen.")]
    fusion, provider = tier(settings, panel(caller=caller))
    events = [e async for e in fusion.call_stream("s/caller", QUESTION)]
    result = events[-1].result  # type: ignore[union-attr]
    assert (result.status, result.failure_reason) == ("ok", "fusion_invocation_capped")
    assert result.content == "Austen."
    assert result.analysis is not None  # the fusion that ran still counts
    assert len(calls_of(provider, "a")) == 1
    states = [(e.call_id, e.state) for e in events if isinstance(e, FusionCallEvent)]
    assert states == [("c1", "running"), ("c1", "done"), ("c2", "capped")]
    refusal = json.loads(calls_of(provider, "caller")[-1].messages[-1].content)
    assert refusal["failure_reason"] == "fusion_invocation_capped"


def crash(request: CompletionRequest) -> Step:
    raise RuntimeError("a bug in a provider")


@pytest.mark.parametrize("form", ["fusion", "caller"])
async def test_a_crash_ends_with_unexpected_error(
    settings: Settings, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    if form == "fusion":
        fusion, _ = tier(settings, panel(a=crash))
        events = [e async for e in fusion.stream(QUESTION)]
    else:
        fusion, _ = tier(settings, panel(caller=crash))
        events = [e async for e in fusion.call_stream("s/caller", QUESTION)]
    result = events[-1].result  # type: ignore[union-attr]
    assert (result.status, result.failure_reason) == ("error", "unexpected_error")
    assert "a bug in a provider" in (result.failure_message or "")
    assert "crashed" in caplog.text


async def test_a_failed_panel_still_lets_the_caller_answer(settings: Settings) -> None:
    caller = [Step("", tool_calls=(FUSE,)), Step("The panel failed; Austen, I believe.")]
    down = Step(status=500, error="panel down")
    fusion, provider = tier(settings, panel(caller=caller, a=down, b=down))
    result = await fusion.call("s/caller", QUESTION)
    assert result.content == "The panel failed; Austen, I believe."
    assert (result.status, result.failure_reason) == ("error", "all_panels_failed")
    tool = json.loads(calls_of(provider, "caller")[-1].messages[-1].content)
    assert tool["failure_reason"] == "all_panels_failed"


# -- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def cli_config() -> Path:
    config = Path(os.environ["OPENFUSION_CONFIG_DIR"])
    (config / "presets").mkdir(parents=True)
    fuse = {"id": "c1", "name": "fusion", "arguments": json.dumps({"prompt": QUESTION})}
    script: dict[str, Any] = {
        "a": {"content": "Jane Austen.", "cost": 0.001},
        "b": {"content": "Austen, in 1813.", "cost": 0.002},
        "judge": {"json": {"content": json.dumps(ANALYSIS)}, "text": {"content": "unused"}},
        "caller": [{"content": "", "tool_calls": [fuse], "cost": 0.01}, {"content": ANSWER}],
        "knowall": [{"content": "I just know."}, {"content": ANSWER}],
    }
    (config / "script.json").write_text(json.dumps(script))
    (config / "config.toml").write_text(
        f'[providers.demo]\ntype = "scripted"\noptions.script = "{config / "script.json"}"\n'
    )
    (config / "presets" / "demo.toml").write_text(
        'judge = "demo/judge"\npanel = [{ model = "demo/a" }, { model = "demo/b" }]\n'
    )
    return config


def test_ask_with_a_caller(cli_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "-p", "demo", "--caller", "demo/caller", QUESTION])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ANSWER}\n"
    for line in ("caller · demo/caller: done", "demo/a: done", "judge · analysis: done"):
        assert line in result.stderr

    as_json = CliRunner().invoke(
        main, ["ask", "-p", "demo", "--caller", "demo/caller", "--json", QUESTION]
    )
    data = json.loads(as_json.stdout)
    assert (data["caller"], data["fused"], data["content"]) == ("demo/caller", True, ANSWER)
    assert set(data["usage"]["cost_details"]) == {"caller", "panel", "analysis"}


def test_ask_can_force_the_fusion(cli_config: Path) -> None:
    args = ["ask", "-p", "demo", "--caller", "demo/knowall"]
    alone = CliRunner().invoke(main, [*args, QUESTION])
    assert alone.stdout == "I just know.\n"
    assert "the caller did not fuse" in alone.stderr
    forced = CliRunner().invoke(main, [*args, "--force-fusion", QUESTION])
    assert forced.exit_code == 0, forced.output
    assert forced.stdout == f"{ANSWER}\n"
    assert "2/2 panel answered" in forced.stderr
    no_caller = CliRunner().invoke(main, ["ask", "-p", "demo", "--force-fusion", QUESTION])
    assert no_caller.exit_code != 0 and "goes with --caller" in no_caller.output


def test_ask_with_an_unknown_caller_is_a_clear_error(cli_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "-p", "demo", "--caller", "nowhere/x", QUESTION])
    assert result.exit_code != 0
    assert "unknown provider 'nowhere'" in result.output


# -- the server's ledger -------------------------------------------------------------------


async def test_the_callers_first_call_stays_in_the_ledger_when_the_run_fails(
    serve: Any,
) -> None:
    demo = setup_demo(
        caller=[Step("", tool_calls=(FUSE,), cost=0.01), Step(status=500, error="caller broke")]
    )
    server: RunningServer = serve(demo.settings, demo.registry)
    body = {
        "model": "demo/caller",
        "messages": [{"role": "user", "content": QUESTION}],
        "plugins": [{"id": "fusion", "analysis_models": ["demo/a", "demo/b"]}],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + "/chat/completions", json=body) as resp,
    ):
        assert resp.status == 502
        assert "caller broke" in (await resp.json())["error"]["message"]
        generation_id = resp.headers["X-Generation-Id"]
    await server.written()
    async with SpendLedger(demo.settings.database) as ledger:
        rows = await ledger.rows(generation_id)
    by_stage = [(r.stage, r.model) for r in rows]
    assert ("caller", "demo/caller") in by_stage
    assert ("panel", "demo/a") in by_stage and ("analysis", "demo/judge") in by_stage
    caller_rows = [r for r in rows if r.stage == "caller"]
    assert sum(r.cost_nano or 0 for r in caller_rows) == 10_000_000  # $0.01, the first call
