"""The rubric grader, with the scripted provider as the grading model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openfusion.cost import Price, PriceCatalog
from openfusion.engine.policy import Caller, RetryPolicy
from openfusion.evals import RubricGrader, load_dataset
from openfusion.evals.rubric import parse_verdicts
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.settings import Settings
from openfusion.types import CompletionRequest

FIXTURES = Path(__file__).parent / "fixtures"


def grader_for(
    settings: Settings, steps: list[Step], batch: int = 3
) -> tuple[RubricGrader, ScriptedProvider]:
    provider = ScriptedProvider({"grader": steps})
    registry = ProviderRegistry(settings)
    registry.register("s", provider)
    caller = Caller(
        registry, PriceCatalog({"s/grader": Price(1e-6, 1e-6)}), policy=RetryPolicy(attempts=1)
    )
    return RubricGrader(caller, "s/grader", PromptSet(), batch=batch), provider


def verdicts(ids: range, met: set[int]) -> Step:
    return Step(json.dumps({f"c{i}": "MET" if i in met else "UNMET" for i in ids}), cost=0.001)


async def test_grades_a_draco_item_in_batches_with_structured_output(settings: Settings) -> None:
    item = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}").items[0]  # 8 criteria
    steps = [
        verdicts(range(1, 4), {1, 2}),
        verdicts(range(4, 7), {4, 6}),
        verdicts(range(7, 9), set()),
    ]
    grader, provider = grader_for(settings, steps)
    answer = "OT transforms; CRDTs commute [1].\n\nSources:\n[1] Shapiro — https://example.org/crdt"
    grade = await grader.grade(item, answer)
    # met: OT (+10), CRDT (+10), the serverless-OT mistake (-10), structure (+5) of 46
    assert grade.score == pytest.approx(100 * 15 / 46)
    assert grade.axes["factual accuracy"] == pytest.approx(100 * 10 / 28)
    assert grade.cost == pytest.approx(0.003)
    assert [c["met"] for c in grade.detail["criteria"]] == [
        True, True, False, True, False, True, False, False
    ]  # fmt: skip
    assert len(provider.calls) == 3
    first: CompletionRequest = provider.calls[0]
    assert first.temperature == 0.0
    assert first.json_schema is not None
    assert first.json_schema["required"] == ["c1", "c2", "c3"]
    assert first.json_schema["properties"]["c1"]["enum"] == ["MET", "UNMET"]
    prompt = first.messages[0].content
    assert item.prompt in prompt and "OT transforms; CRDTs commute ." in prompt
    assert "Sources:" not in prompt  # the grader reads the answer, not the appended list
    assert item.rubric[0].criterion in prompt and item.rubric[3].criterion not in prompt


async def test_a_reply_that_does_not_parse_is_asked_again(settings: Settings) -> None:
    item = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}").items[1]  # 3 criteria
    steps = [
        Step("MET, UNMET, MET"),
        Step('{"c1": "MET", "c2": "maybe"}'),
        verdicts(range(1, 4), {1, 3}),
    ]
    grader, provider = grader_for(settings, steps)
    grade = await grader.grade(item, "Roth is after tax. Choose Roth.")
    assert grade.score == 100.0
    assert grade.error is None
    assert len(provider.calls) == 3


async def test_grading_fails_with_a_reason_after_its_tries(settings: Settings) -> None:
    item = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}").items[1]
    grader, _ = grader_for(settings, [Step("no idea")])
    grade = await grader.grade(item, "answer")
    assert grade.score is None
    assert grade.error == "grader s/grader: the reply is not a JSON object (after 3 tries)"
    down, _ = grader_for(settings, [Step(status=503, error="overloaded")])
    grade = await down.grade(item, "answer")
    assert grade.score is None
    assert grade.error is not None and "overloaded" in grade.error


def test_parse_verdicts() -> None:
    assert parse_verdicts('```json\n{"c1": "met", "c2": "UNMET"}\n```', ["c1", "c2"]) == (
        {"c1": True, "c2": False},
        "",
    )
    assert parse_verdicts('{"c1": "MET"}', ["c1", "c2"]) == (
        None,
        "no MET/UNMET verdict for criterion c2",
    )
