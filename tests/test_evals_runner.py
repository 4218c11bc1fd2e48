"""The eval runner on scripted models: records, resume after interruption, --max-cost, the
checks a rerun makes, and the tools a DRACO run may not use."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import ANALYSIS

from openfusion.cost import Price, PriceCatalog
from openfusion.engine.policy import Caller, RetryPolicy
from openfusion.errors import ConfigError
from openfusion.evals import Dataset, EvalConfig, EvalPlan, EvalRunner, Item, load_dataset
from openfusion.evals.records import Record
from openfusion.presets import PanelSlot, Preset
from openfusion.providers import ProviderRegistry
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.settings import Settings
from openfusion.types import CompletionRequest

FIXTURES = Path(__file__).parent / "fixtures"
TOY = Dataset(
    "toy", tuple(Item(f"q{n}", f"What is 6 * {n}?", answer=str(6 * n)) for n in range(1, 5))
)


def judge(request: CompletionRequest) -> Step:
    if request.json_schema is not None:
        return Step(json.dumps(ANALYSIS), cost=0.001)
    question = request.messages[-1].content
    n = int(question.split("6 * ")[1].split("?")[0])
    return Step(f"The answer is {6 * n}.", cost=0.001)


def script() -> dict[str, Any]:
    panel = Step("I think it is forty-something.", cost=0.001)
    return {"a": panel, "b": panel, "judge": judge, "solo": Step("Maybe 41.", cost=0.001)}


def caller_for(
    settings: Settings, prices: dict[str, Price] | None = None
) -> tuple[Caller, ScriptedProvider]:
    provider = ScriptedProvider(script())
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    return Caller(registry, PriceCatalog(prices or {}), policy=RetryPolicy(attempts=1)), provider


FUSED = EvalConfig(
    "fused", preset=Preset("fused", (PanelSlot("s/a"), PanelSlot("s/b")), judge="s/judge")
)
SINGLE = EvalConfig("s/solo", model="s/solo")


def plan(tmp_path: Path, **kwargs: Any) -> EvalPlan:
    return EvalPlan(datasets=[TOY], configs=[FUSED, SINGLE], output=tmp_path / "out", **kwargs)


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "out" / "results.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


async def test_every_item_on_every_config_recorded_as_it_finishes(
    settings: Settings, tmp_path: Path
) -> None:
    caller, provider = caller_for(settings)
    seen: list[tuple[str, str, float]] = []
    runner = EvalRunner(plan(tmp_path), settings, caller=caller)
    outcome = await runner.run(lambda r, spent: seen.append((r.item_id, r.config, spent)))
    assert [(i, c) for i, c, _ in seen] == [
        (f"q{n}", c) for n in range(1, 5) for c in ("fused", "s/solo")
    ]  # item by item
    assert seen[-1][2] == pytest.approx(outcome.spent) == pytest.approx(4 * 0.004 + 4 * 0.001)
    fused = outcome.records[("toy", "q3", "fused")]
    assert (fused.score, fused.status, fused.kind, fused.grader) == (
        100.0,
        "ok",
        "fused",
        "numeric",
    )
    assert fused.answer == "The answer is 18."
    assert len(fused.run_id) == 32 and fused.cost == pytest.approx(0.004)
    single = outcome.records[("toy", "q3", "s/solo")]
    assert (single.score, single.detail) == (0.0, {"expected": 18.0, "read": 41.0})
    assert len(single.run_id) == 32 and single.run_id != fused.run_id
    assert len(lines(tmp_path)) == 8
    solo_call = next(c for c in provider.calls if c.model == "solo")
    assert solo_call.messages[0].role == "system"  # answers as a panel member does
    assert solo_call.messages[-1].content == "What is 6 * 1?"


async def test_a_failed_answer_scores_zero_and_lists_why(
    settings: Settings, tmp_path: Path
) -> None:
    caller, provider = caller_for(settings)
    provider.script = {**script(), "solo": Step(status=500, error="upstream broke")}  # type: ignore[misc]
    outcome = await EvalRunner(plan(tmp_path), settings, caller=caller).run()
    record = outcome.records[("toy", "q1", "s/solo")]
    assert (record.status, record.score, record.answer) == ("error", 0.0, "")
    assert record.failures == ("s/solo: upstream_error (upstream broke)",)


async def test_resume_after_interruption_runs_only_what_is_left(
    settings: Settings, tmp_path: Path
) -> None:
    caller, provider = caller_for(settings)
    runner = EvalRunner(plan(tmp_path), settings, caller=caller)
    task: asyncio.Task[Any] | None = None

    def stop_after_three(record: Record, spent: float) -> None:
        if len(lines(tmp_path)) == 3 and task is not None:
            task.cancel()  # Ctrl-C, or a crash, after three results were written

    task = asyncio.create_task(runner.run(stop_after_three))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(lines(tmp_path)) == 3
    with (tmp_path / "out" / "results.jsonl").open("a") as file:
        file.write('{"dataset": "toy", "item_id": "q2", "con')  # torn by the crash
    calls_before = len(provider.calls)
    again, provider2 = caller_for(settings)
    outcome = await EvalRunner(plan(tmp_path), settings, caller=again).run()
    assert len(outcome.records) == 8
    keys = [(r["item_id"], r["config"]) for r in lines(tmp_path)]
    assert len(keys) == len(set(keys)) == 8  # nothing twice, the torn line gone
    assert calls_before > 0
    assert not any("6 * 1?" in c.messages[-1].content for c in provider2.calls)  # q1 was done


async def test_max_cost_stops_before_spending_more(settings: Settings, tmp_path: Path) -> None:
    prices = {f"s/{m}": Price(1e-6, 1e-6) for m in ("a", "b", "judge", "solo")}
    caller, _ = caller_for(settings, prices)
    # a call's worst case is ~$0.0041 (4096 tokens); item 1 really costs $0.005
    outcome = await EvalRunner(plan(tmp_path, max_cost=0.012), settings, caller=caller).run()
    assert outcome.stopped_by_budget
    assert outcome.spent <= 0.012
    assert set(outcome.records) == {("toy", "q1", "fused"), ("toy", "q1", "s/solo")}
    assert outcome.not_run >= 6
    # the budget is for the directory: a rerun with more finishes, counting what was spent
    more, _ = caller_for(settings, prices)
    outcome = await EvalRunner(plan(tmp_path, max_cost=1.0), settings, caller=more).run()
    assert not outcome.stopped_by_budget and len(outcome.records) == 8
    assert outcome.spent == pytest.approx(8 * 0.0025, abs=0.002)


async def test_a_rerun_refuses_changed_configs_items_or_grader(
    settings: Settings, tmp_path: Path
) -> None:
    caller, _ = caller_for(settings)
    await EvalRunner(plan(tmp_path), settings, caller=caller).run()
    other_judge = EvalConfig(
        "fused", preset=Preset("fused", (PanelSlot("s/a"), PanelSlot("s/b")), judge="s/solo")
    )
    changed = EvalPlan(datasets=[TOY], configs=[other_judge], output=tmp_path / "out")
    with pytest.raises(ConfigError, match="config 'fused' has changed"):
        await EvalRunner(changed, settings, caller=caller).run()
    items = (Item("q1", "What is 6 * 100?", answer="600"),)
    edited = EvalPlan(datasets=[Dataset("toy", items)], configs=[SINGLE], output=tmp_path / "out")
    with pytest.raises(ConfigError, match="item q1 of toy differs"):
        await EvalRunner(edited, settings, caller=caller).run()


async def test_rubric_datasets_need_a_grader_and_keep_it(
    settings: Settings, tmp_path: Path
) -> None:
    draco = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}")
    caller, _ = caller_for(settings)
    bare = EvalPlan(datasets=[draco], configs=[SINGLE], output=tmp_path / "out")
    with pytest.raises(ConfigError, match="--grader"):
        EvalRunner(bare, settings, caller=caller)


async def test_a_draco_run_keeps_its_hosts_out_of_the_tools(
    settings: Settings, tmp_path: Path
) -> None:
    draco = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}")
    caller, _ = caller_for(settings)
    run = EvalPlan(
        datasets=[draco, TOY],
        configs=[FUSED, SINGLE],
        output=tmp_path / "out",
        grader_model="s/judge",
    )
    runner = EvalRunner(run, settings, caller=caller)
    for config in ("fused", "s/solo"):
        answerer = runner.answerers[("draco", config)]
        tools = answerer.fusion.tools if answerer.fusion else answerer.tools
        assert tools is not None and "web_fetch" in tools
        for url in (
            "https://huggingface.co/datasets/perplexity-ai/draco/raw/main/test.jsonl",
            "https://cdn-lfs.hf.co/repos/draco/test.jsonl",
        ):
            result = await tools.call("web_fetch", json.dumps({"url": url}))
            assert result.error is not None and "deny_hosts" in result.error


def test_configs_are_presets_preset_files_or_model_ids(settings: Settings, tmp_path: Path) -> None:
    from openfusion.evals import parse_configs

    panel = tmp_path / "duo.toml"
    panel.write_text('judge = "s/judge"\npanel = [{ model = "s/a" }, { model = "s/b" }]\n')
    configs = parse_configs(f"local, self:local/gemma-3-270m,{panel},openrouter/x/y", settings)
    assert [(c.name, c.kind) for c in configs] == [
        ("local", "fused"),
        ("self:local/gemma-3-270m", "fused"),
        (str(panel), "fused"),
        ("openrouter/x/y", "single"),
    ]
    assert configs[2].preset is not None and configs[2].preset.judge == "s/judge"
    assert configs[0].fingerprint != configs[1].fingerprint
    with pytest.raises(ConfigError, match="names a config twice"):
        parse_configs("local,local", settings)


async def test_a_fused_record_has_the_oracle_of_its_panel(
    settings: Settings, tmp_path: Path
) -> None:
    """The oracle is the best grade of any panel answer: here member b is right (6 * n),
    member a never, and the judge's answer is graded apart."""

    def right(request: CompletionRequest) -> Step:
        n = int(request.messages[-1].content.split("6 * ")[1].split("?")[0])
        return Step(str(6 * n))

    provider = ScriptedProvider({**script(), "b": right})
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    caller = Caller(registry, PriceCatalog({}), policy=RetryPolicy(attempts=1))
    outcome = await EvalRunner(plan(tmp_path), settings, caller=caller).run()
    fused = outcome.records[("toy", "q2", "fused")]
    assert (fused.score, fused.oracle) == (100.0, 100.0)
    assert outcome.records[("toy", "q2", "s/solo")].oracle is None  # a single has no panel
    from openfusion.evals.summary import summarise

    (table,) = summarise(list(outcome.records.values()), ["fused", "s/solo"])
    assert [(r.config, r.oracle) for r in table.rows] == [("fused", 100.0), ("s/solo", None)]
    summary = (tmp_path / "out" / "results.jsonl").read_text()
    assert '"oracle": 100.0' in summary


async def test_the_plans_temperature_reaches_every_config(
    settings: Settings, tmp_path: Path
) -> None:
    caller, provider = caller_for(settings)
    await EvalRunner(plan(tmp_path, temperature=0.0), settings, caller=caller).run()
    panel = [c.temperature for c in provider.calls if c.model in ("a", "b", "solo")]
    assert panel and set(panel) == {0.0}


def test_offset_skips_the_items_tuned_on(tmp_path: Path) -> None:
    file = tmp_path / "items.jsonl"
    rows = [{"id": f"i{n}", "prompt": f"q{n}", "answer": str(n)} for n in range(6)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [i.id for i in load_dataset(str(file), 2, offset=3).items] == ["i3", "i4"]
    assert [i.id for i in load_dataset(str(file), None, offset=4).items] == ["i4", "i5"]
    generated = load_dataset("reasoning-gym:basic_arithmetic", 2, offset=3)
    assert [i.id for i in generated.items] == ["basic_arithmetic-3", "basic_arithmetic-4"]
    assert generated.items == load_dataset("reasoning-gym:basic_arithmetic", 5).items[3:]
