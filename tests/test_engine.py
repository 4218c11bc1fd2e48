"""The engine, driven by the scripted provider."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import ANALYSIS_KEYS

from openfusion import (
    AnswerDelta,
    ConfigError,
    Done,
    Fusion,
    MemberEvent,
    PanelSlot,
    Preset,
    ProviderRegistry,
    Settings,
    StageEvent,
)
from openfusion.engine import DEPTH_HEADER
from openfusion.providers.base import HONOURS_ALL
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.types import Chunk, Completion, CompletionRequest, Usage

ANALYSIS = {
    "consensus": ["Jane Austen wrote it"],
    "contradictions": [
        {
            "topic": "year",
            "stances": [
                {"model": "Response A", "stance": "1813"},
                {"model": "Response B", "stance": "1811"},
            ],
        }
    ],
    "partial_coverage": [{"models": ["Response A"], "point": "published anonymously"}],
    "unique_insights": [{"model": "Response B", "insight": "her second novel"}],
    "blind_spots": ["the original title"],
}
FINAL = "Jane Austen wrote Pride and Prejudice, published in 1813."


def fusion_for(
    settings: Settings,
    script: dict[str, Any],
    panel: list[str] | None = None,
    judge: str = "scripted/judge",
    **kwargs: Any,
) -> tuple[Fusion, ScriptedProvider]:
    provider = ScriptedProvider(script)
    registry = ProviderRegistry(settings)
    registry.register("scripted", provider)
    slots = tuple(PanelSlot(m) for m in (panel or ["scripted/a", "scripted/b", "scripted/c"]))
    preset = Preset("test", slots, judge=judge)
    return Fusion(preset, settings=settings, registry=registry, **kwargs), provider


def judge_steps(analysis: str = json.dumps(ANALYSIS), final: str = FINAL) -> list[Step]:
    return [Step(analysis), Step(final)]


def panel_script(delay: float = 0.0, cost: float | None = 0.001) -> dict[str, Any]:
    return {
        "a": Step("Jane Austen, in 1813.", delay=delay, cost=cost),
        "b": Step("Austen wrote it in 1811.", delay=delay, cost=cost),
        "c": Step("Jane Austen.", delay=delay, cost=cost),
    }


async def test_each_run_has_an_id_or_the_one_given(settings: Settings) -> None:
    script = {**panel_script(), "judge": judge_steps() * 2}
    fusion, _ = fusion_for(settings, script)
    async with fusion:
        first = await fusion.run("Who wrote Pride and Prejudice?")
        named = await fusion.run("Who wrote Pride and Prejudice?", run_id="gen-42")
    assert len(first.run_id) == 32
    assert named.run_id == "gen-42"
    assert named.to_dict()["run_id"] == "gen-42"


async def test_full_run_result_has_contract_shape(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, {**panel_script(), "judge": judge_steps()})
    result = await fusion.run("Who wrote Pride and Prejudice?")
    assert result.status == "ok"
    assert result.content == FINAL
    assert result.failure_reason is None
    assert len(result.responses) == 3
    assert result.analysis is not None
    assert set(result.analysis) == ANALYSIS_KEYS
    data = result.to_dict()
    assert {"status", "analysis", "responses", "failed_models", "failure_reason", "usage"} <= set(
        data
    )
    assert set(data["responses"][0]) >= {"model", "content", "usage", "cost", "latency_ms"}


async def test_panel_runs_concurrently(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, {**panel_script(delay=1.0), "judge": judge_steps()})
    started = time.monotonic()
    result = await fusion.run("q")
    elapsed = time.monotonic() - started
    assert len(result.responses) == 3
    # Three 1 s members: sequential would take 3 s or more.
    assert elapsed < 2.5, f"panel looks sequential: {elapsed:.2f}s"
    assert all(r.latency_ms >= 1000 for r in result.responses)


async def test_judge_sees_anonymised_shuffled_answers(settings: Settings) -> None:
    orders = set()
    for seed in range(8):
        fusion, provider = fusion_for(
            settings, {**panel_script(), "judge": judge_steps()}, shuffle_seed=seed
        )
        await fusion.run("Who wrote Pride and Prejudice?")
        judge_prompt = next(
            c.messages[-1].content for c in provider.calls if c.json_schema is not None
        )
        for model in ("scripted/a", "scripted/b", "scripted/c"):
            assert model not in judge_prompt
        assert all(f"Response {x}:" in judge_prompt for x in "ABC")
        order = tuple(
            sorted(
                ("Jane Austen, in 1813.", "Austen wrote it in 1811.", "Jane Austen."),
                key=judge_prompt.index,
            )
        )
        orders.add(order)
    assert len(orders) > 1, "the judge always saw the answers in one order"


async def test_analysis_labels_map_back_to_members(settings: Settings) -> None:
    fusion, provider = fusion_for(
        settings, {**panel_script(), "judge": judge_steps()}, shuffle_seed=3
    )
    result = await fusion.run("q")
    judge_prompt = next(c.messages[-1].content for c in provider.calls if c.json_schema)
    # Whoever was shown as "Response A" must be named in the analysis's first stance.
    label_a_text = judge_prompt.split("Response A: ", 1)[1].split("\n", 1)[0]
    member_a = next(r.name for r in result.responses if r.content == label_a_text)
    assert result.analysis is not None
    assert result.analysis["contradictions"][0]["stances"][0]["model"] == member_a
    assert "Response" not in json.dumps(result.analysis)


async def test_judge_request_is_constrained_and_deterministic(settings: Settings) -> None:
    fusion, provider = fusion_for(settings, {**panel_script(), "judge": judge_steps()})
    await fusion.run("q", temperature=0.9)
    analysis_call = next(c for c in provider.calls if c.json_schema is not None)
    assert analysis_call.temperature == 0.0
    labels = analysis_call.json_schema["properties"]["unique_insights"]["items"]["properties"][
        "model"
    ]["enum"]
    assert labels == ["Response A", "Response B", "Response C"]
    panel_calls = [c for c in provider.calls if c.model in ("a", "b", "c")]
    assert [c.temperature for c in panel_calls] == [0.9, 0.9, 0.9]
    assert all(c.messages[0].role == "system" for c in panel_calls)


async def test_invalid_judge_json_still_answers(settings: Settings) -> None:
    fusion, _ = fusion_for(
        settings, {**panel_script(), "judge": judge_steps(analysis="I think A is best.")}
    )
    result = await fusion.run("q")
    assert result.status == "ok"
    assert result.failure_reason == "judge_not_valid_json"
    assert result.analysis is None
    assert result.content == FINAL


async def test_judge_wrong_schema_is_a_schema_mismatch(settings: Settings) -> None:
    wrong = json.dumps({"consensus": "everyone agrees"})
    fusion, _ = fusion_for(settings, {**panel_script(), "judge": judge_steps(analysis=wrong)})
    result = await fusion.run("q")
    assert result.failure_reason == "judge_schema_mismatch"
    assert result.analysis is None
    assert result.content == FINAL


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"confidence": "high"}, "confidence"),  # a sixth key is not dropped: it is an error
        ({"unique_insights": [{"model": "Response Z", "insight": "x"}]}, "'Response Z'"),
        ({"unique_insights": [{"model": "GPT-5", "insight": "x"}]}, "not a panel label"),
    ],
)
async def test_an_analysis_beyond_the_contract_is_a_schema_mismatch(
    settings: Settings, change: dict[str, Any], fragment: str
) -> None:
    analysis = json.dumps({**ANALYSIS, **change})
    fusion, _ = fusion_for(settings, {**panel_script(), "judge": judge_steps(analysis=analysis)})
    result = await fusion.run("q")
    assert (result.status, result.failure_reason) == ("ok", "judge_schema_mismatch")
    assert fragment in (result.failure_message or "")
    assert result.analysis is None
    assert result.content == FINAL


async def test_the_analysis_has_exactly_the_five_keys(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, {**panel_script(), "judge": judge_steps()})
    result = await fusion.run("q")
    assert result.analysis is not None
    assert list(result.analysis) == [
        "consensus",
        "contradictions",
        "partial_coverage",
        "unique_insights",
        "blind_spots",
    ]


async def test_judge_empty_analysis(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, {**panel_script(), "judge": judge_steps(analysis="  ")})
    result = await fusion.run("q")
    assert result.failure_reason == "judge_empty_completion"
    assert result.content == FINAL


async def test_judge_down_falls_back_to_a_panel_answer(settings: Settings) -> None:
    script = {**panel_script(), "judge": Step(status=503, error="judge overloaded")}
    fusion, _ = fusion_for(settings, script)
    result = await fusion.run("q")
    assert result.status == "ok"
    assert result.failure_reason == "judge_upstream_error"
    assert "judge overloaded" in (result.failure_message or "")
    assert result.content == "Jane Austen, in 1813."  # the first panel member's answer


async def test_failed_member_is_recorded_and_others_used(settings: Settings) -> None:
    script = {
        **panel_script(),
        "c": Step(status=429, error="Rate limit exceeded: free-models-per-min"),
        "judge": judge_steps(),
    }
    fusion, provider = fusion_for(settings, script)
    result = await fusion.run("q")
    assert result.status == "ok"
    assert [r.name for r in result.responses] == ["scripted/a", "scripted/b"]
    (failure,) = result.failed_models
    assert failure.to_dict() == {
        "model": "scripted/c",
        "name": "scripted/c",
        "reason": "rate_limited",
        "status": 429,
        "message": "Rate limit exceeded: free-models-per-min",
        "tries": 1,
    }
    judge_prompt = next(c.messages[-1].content for c in provider.calls if c.json_schema)
    assert "Response C" not in judge_prompt


@pytest.mark.parametrize(
    ("statuses", "reason"),
    [
        ((429, 429, 429), "rate_limited"),
        ((402, 402, 402), "insufficient_credits"),
        ((500, 429, 404), "all_panels_failed"),
    ],
)
async def test_all_members_failed(
    settings: Settings, statuses: tuple[int, ...], reason: str
) -> None:
    script: dict[str, Any] = {
        m: Step(status=s, error=f"{m} said {s}") for m, s in zip("abc", statuses, strict=True)
    }
    fusion, provider = fusion_for(settings, {**script, "judge": judge_steps()})
    result = await fusion.run("q")
    assert result.status == "error"
    assert result.failure_reason == reason
    assert result.content == ""
    assert "a said" in (result.failure_message or "")
    assert not any(c.model == "judge" for c in provider.calls)


async def test_empty_member_answer_is_a_failure(settings: Settings) -> None:
    script = {**panel_script(), "b": Step("   "), "judge": judge_steps()}
    fusion, _ = fusion_for(settings, script)
    result = await fusion.run("q")
    assert [f.reason for f in result.failed_models] == ["empty_completion"]


async def test_usage_and_cost_are_summed(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, {**panel_script(cost=0.01), "judge": judge_steps()})
    result = await fusion.run("q")
    assert result.cost_details == {"panel": pytest.approx(0.03), "analysis": 0.0, "synthesis": 0.0}
    assert result.usage.cost == pytest.approx(0.03)
    assert result.usage.completion_tokens == sum(
        r.usage.completion_tokens for r in result.responses
    ) + len(json.dumps(ANALYSIS).split()) + len(FINAL.split())


async def test_unknown_cost_makes_total_unknown(settings: Settings) -> None:
    script = {**panel_script(), "b": Step("answer", cost=None), "judge": judge_steps()}
    fusion, _ = fusion_for(settings, script)
    result = await fusion.run("q")
    assert result.usage.cost is None
    assert result.cost_details["panel"] is None
    assert result.to_dict()["usage"]["unpriced"] == ["scripted/b"]  # the flag: who is unknown


async def test_every_inner_call_carries_the_depth_header(settings: Settings) -> None:
    fusion, provider = fusion_for(settings, {**panel_script(), "judge": judge_steps()}, depth=2)
    await fusion.run("q")
    assert len(provider.calls) == 5
    assert all(c.headers == {DEPTH_HEADER: "3"} for c in provider.calls)


async def test_stream_events_and_deltas(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, {**panel_script(), "judge": judge_steps()})
    events = [e async for e in fusion.stream("q")]
    deltas = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    done = events[-1]
    assert isinstance(done, Done)
    assert deltas == done.result.content == FINAL
    states = [(e.name, e.state) for e in events if isinstance(e, MemberEvent)]
    assert states[:3] == [(m, "waiting") for m in ("scripted/a", "scripted/b", "scripted/c")]
    assert sorted(s for _, s in states[3:]) == ["done"] * 3 + ["running"] * 3
    stages = [(e.stage, e.state) for e in events if isinstance(e, StageEvent)]
    assert stages == [
        ("analysis", "running"),
        ("analysis", "done"),
        ("synthesis", "running"),
        ("synthesis", "done"),
    ]


async def test_copies_of_one_model_get_distinct_names_and_samples(settings: Settings) -> None:
    fusion, provider = fusion_for(settings, {})
    preset = Preset(
        "self",
        tuple(PanelSlot("scripted/m", t, s) for t, s in ((0.5, 1), (0.8, 2), (1.1, 3))),
        judge="scripted/judge",
    )
    provider.script = {"m": Step("same model"), "judge": judge_steps()}  # type: ignore[misc]
    fusion = Fusion(preset, settings=settings, registry=fusion.registry)
    result = await fusion.run("q")
    assert [r.name for r in result.responses] == ["scripted/m#1", "scripted/m#2", "scripted/m#3"]
    samples = [(c.temperature, c.seed) for c in provider.calls if c.model == "m"]
    assert samples == [(0.5, 1), (0.8, 2), (1.1, 3)]


async def test_unknown_provider_fails_before_any_call(settings: Settings) -> None:
    fusion, provider = fusion_for(settings, panel_script(), panel=["scripted/a", "nowhere/model"])
    with pytest.raises(ConfigError, match="unknown provider 'nowhere'"):
        await fusion.run("q")
    assert provider.calls == []


async def test_empty_question_is_refused(settings: Settings) -> None:
    fusion, _ = fusion_for(settings, panel_script())
    with pytest.raises(ConfigError, match="non-empty user message"):
        await fusion.run("   ")


class Hanging:
    """A provider whose calls never end; records whether they were cancelled."""

    supports_json_schema = True
    honours = HONOURS_ALL

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        yield Chunk(usage=Usage(), finish_reason="stop")
        raise AssertionError("unused")

    async def aclose(self) -> None:
        return None


async def test_closing_the_stream_cancels_running_calls(settings: Settings) -> None:
    hanging = Hanging()
    registry = ProviderRegistry(settings)
    registry.register("hang", hanging)
    preset = Preset("h", (PanelSlot("hang/x"), PanelSlot("hang/y")), judge="hang/j")
    stream = Fusion(preset, settings=settings, registry=registry).stream("q")
    async for event in stream:
        if isinstance(event, MemberEvent) and event.state == "running" and event.index == 1:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert hanging.started == 2
    assert hanging.cancelled == 2
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_without_synthesis_stops_after_the_analysis(settings: Settings) -> None:
    fusion, provider = fusion_for(settings, {**panel_script(), "judge": judge_steps()})
    result = await fusion.run("q", synthesise=False)
    assert result.analysis is not None
    assert result.content == ""
    assert len(provider.calls) == 4  # three members and one analysis, no synthesis call
    assert set(result.cost_details) == {"panel", "analysis"}
