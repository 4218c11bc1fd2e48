"""Graders that need no model: ``exact``, ``alias``, ``numeric`` and ``choice``.

Every grader scores 0-100, so one table reads the same whatever grades it. Answers are read
without the Sources list and ``[n]`` markers a fused answer carries. Text is normalised the
SQuAD/TriviaQA way: lower case, punctuation and the articles a/an/the dropped, spaces
collapsed. ``alias`` is met when any alias appears as a run of whole words inside the answer;
``numeric`` compares the answer's final number (a ``\\boxed{}`` or ``answer:`` number first)
within a tolerance; ``choice`` reads the letter (or the text) of the option chosen.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from openfusion.engine.citations import without_sources
from openfusion.evals.items import Item

GraderKind = Literal["exact", "alias", "numeric", "choice", "rubric"]

REL_TOL = 1e-4
ABS_TOL = 1e-6
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation) | set("\u2018\u2019\u201c\u201d\u2013\u2014\u2026")
MINUS = "\u2212"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Grade:
    score: float | None
    """0-100; ``None`` when grading failed (``error`` says why)."""
    axes: dict[str, float] = field(default_factory=dict)
    """Rubric scores per axis, 0-100."""
    detail: dict[str, Any] = field(default_factory=dict)
    """What decided it: the alias matched, the number read, each criterion's verdict..."""
    cost: float | None = 0.0
    """USD the grading itself spent (an LLM grader's calls)."""
    error: str | None = None


def grader_kind(item: Item) -> GraderKind:
    if item.rubric:
        return "rubric"
    if item.aliases:
        return "alias"
    if item.choices:
        return "choice"
    return "numeric" if parse_number(item.answer or "") is not None else "exact"


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def grade_exact(item: Item, answer: str) -> Grade:
    expected = [item.answer or "", *item.aliases]
    said = normalise(without_sources(answer))
    hit = next((e for e in expected if e.strip() and normalise(e) == said), None)
    return Grade(100.0 if hit is not None else 0.0, detail={"matched": hit})


def grade_alias(item: Item, answer: str) -> Grade:
    said = f" {normalise(without_sources(answer))} "
    for alias in item.aliases or (item.answer or "",):
        wanted = normalise(alias)
        if wanted and f" {wanted} " in said:
            return Grade(100.0, detail={"matched": alias})
    return Grade(0.0, detail={"matched": None})


def parse_number(text: str) -> float | None:
    """``text`` as a number when it is one ("1,234", "-0.5", "3/4", "12%"), else ``None``."""
    cleaned = text.strip().replace(MINUS, "-").rstrip("%").strip()
    fraction = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", cleaned)
    if fraction and int(fraction.group(2)):
        return int(fraction.group(1)) / int(fraction.group(2))
    if _NUMBER.fullmatch(cleaned):
        return float(cleaned.replace(",", ""))
    return None


def final_number(answer: str) -> float | None:
    """The number an answer gives: in ``\\boxed{}``, else right after "answer:", else its last."""
    text = without_sources(answer).replace(MINUS, "-")
    for pattern in (_BOXED, _ANSWER_LINE):
        found = pattern.findall(text)
        numbers = _NUMBER.findall(found[-1]) if found else []
        if numbers:  # the first number of the last box or "answer:" line
            return float(numbers[0].replace(",", ""))
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def grade_numeric(item: Item, answer: str) -> Grade:
    expected = parse_number(item.answer or "")
    got = final_number(answer)
    tolerance = float(item.meta.get("tolerance", 0.0) or 0.0)
    ok = (
        expected is not None
        and got is not None
        and (
            abs(got - expected) <= tolerance
            or math.isclose(got, expected, rel_tol=REL_TOL, abs_tol=ABS_TOL)
        )
    )
    return Grade(100.0 if ok else 0.0, detail={"expected": expected, "read": got})


LETTERS = string.ascii_uppercase


def chosen_option(item: Item, answer: str) -> int | None:
    """The index of the option the answer picks: by its letter, else by its whole text."""
    text = without_sources(answer).strip()
    letters = LETTERS[: len(item.choices)]
    patterns = (
        rf"^\(?([{letters}])[).:\s]",
        rf"^([{letters}])$",
        rf"answer\s*(?:is|:)?\s*\(?([{letters}])\b",
        rf"\(([{letters}])\)",
    )
    for pattern in patterns:
        match = re.search(pattern, text, re.IGNORECASE if "answer" in pattern else 0)
        if match:
            return letters.index(match.group(1).upper())
    said = f" {normalise(text)} "
    named = [i for i, c in enumerate(item.choices) if normalise(c) and f" {normalise(c)} " in said]
    return named[0] if len(named) == 1 else None


def correct_option(item: Item) -> int | None:
    answer = (item.answer or "").strip()
    if len(answer) == 1 and answer.upper() in LETTERS[: len(item.choices)]:
        return LETTERS.index(answer.upper())
    matches = [i for i, c in enumerate(item.choices) if normalise(c) == normalise(answer)]
    return matches[0] if matches else None


def grade_choice(item: Item, answer: str) -> Grade:
    chosen, correct = chosen_option(item, answer), correct_option(item)
    if correct is None:
        return Grade(None, error=f"item {item.id}: answer {item.answer!r} is none of its choices")
    detail = {"chosen": None if chosen is None else LETTERS[chosen], "correct": LETTERS[correct]}
    return Grade(100.0 if chosen == correct else 0.0, detail=detail)


RULE_GRADERS = {
    "exact": grade_exact,
    "alias": grade_alias,
    "numeric": grade_numeric,
    "choice": grade_choice,
}
