"""The judge's *select* mode, and what is never an answer.

A small base model (the embedded 270M) writes worse analyses and answers than its own panel:
asked to synthesise, it rewrites a unanimous "Heart" into "The Mona Lisa". In select mode the
judge writes nothing: the final answer is one of the panel's answers, verbatim, chosen by

1. agreement — how many members gave it (after normalising case, punctuation, articles), and
2. likelihood — the judge model's own mean log-probability per token of the answer, given the
   question as the panel saw it (providers that can score text: ``providers.base.Scorer``).

``score = AGREEMENT_WEIGHT * (votes - 1) + mean log-probability``; ties go to the earlier panel
member (the preset puts its greedy sample first). The five-key analysis is built from the same
groups, deterministically: a unanimous panel's answer is kept as it is, never rewritten.

``clean`` applies to every panel answer in every mode: a tool call written as text (a model
without native tools copying the JSON it was shown) and the fence markers around tool output
are never answers.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openfusion.engine.result import MemberResponse

AGREEMENT_WEIGHT = 0.5
"""Log-probability units one more vote is worth. Voting alone hurts a 270M model (majority of
five samples: 13% right on TriviaQA against 18% greedy), likelihood alone mostly re-picks the
greedy answer; half a unit per vote did best on TriviaQA items 0-38 (benchmarks/README.md)."""

_FENCE = re.compile(r"<<<(?:END-)?UNTRUSTED-DATA[^\n]*?(?:>>>|$)", re.MULTILINE)
_LABEL = re.compile(r"^\s*(?:A|Answer)\s*:\s*", re.IGNORECASE)
_LEAD_ONLY = re.compile(r"^(?:the\s+)?answer(?:\s+is)?\s*:?$", re.IGNORECASE)
"""What is left of "The answer is: <<<UNTRUSTED-DATA ..." once the marker is cut out."""
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation + "\u2018\u2019\u201c\u201d"})


def clean(text: str) -> str:
    """The answer in ``text``: fence markers cut out, a leading "Answer:" label dropped; ``""``
    when what is left is no answer at all (a tool call written as JSON, or nothing)."""
    body = _LABEL.sub("", _FENCE.sub("", text)).strip()
    return "" if _is_tool_call(body) or _LEAD_ONLY.match(body) else body


def _is_tool_call(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        data = json.loads(text)
    except ValueError:  # cut short: judge by its opening
        return bool(re.match(r'\{\s*"(tool|name|function|tool_calls?)"\s*:', text))
    if not isinstance(data, dict):
        return False
    return any(key in data for key in ("tool", "function", "tool_calls")) or (
        "name" in data and "arguments" in data
    )


def normalise(text: str) -> str:
    """What two answers must share to count as the same: words, not case, punctuation, articles
    or a trailing full stop."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


@dataclass(frozen=True, slots=True)
class Candidate:
    """One distinct answer and the members that gave it (in panel order)."""

    text: str
    members: tuple[MemberResponse, ...]
    loglik: float = 0.0
    """Mean log-probability per token under the judge (0.0 when it cannot score)."""

    @property
    def votes(self) -> int:
        return len(self.members)

    @property
    def score(self) -> float:
        return AGREEMENT_WEIGHT * (self.votes - 1) + self.loglik


def candidates(responses: Sequence[MemberResponse]) -> list[Candidate]:
    """The distinct answers, in the order first given; each keeps its first wording."""
    groups: dict[str, list[MemberResponse]] = {}
    for response in responses:  # "?" normalises to nothing: it is compared as it is written
        key = normalise(response.content) or response.content.strip()
        groups.setdefault(key, []).append(response)
    return [Candidate(members[0].content, tuple(members)) for members in groups.values()]


def best(scored: Sequence[Candidate]) -> Candidate:
    """The highest score; the first given wins a tie."""
    return max(enumerate(scored), key=lambda pair: (pair[1].score, -pair[0]))[1]


def analysis(
    question: str, scored: Sequence[Candidate], panel_size: int, max_chars: int
) -> dict[str, Any]:
    """The five keys, built from the candidate groups (member names, as a judge's analysis
    reads once its labels are mapped back)."""

    def cut(text: str) -> str:
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    majority = [c for c in scored if c.votes * 2 > panel_size]
    shared = [c for c in scored if c.votes >= 2 and c not in majority]
    contradictions = []
    if len(scored) > 1:
        stances = [{"model": m.name, "stance": cut(c.text)} for c in scored for m in c.members]
        contradictions.append({"topic": cut(question), "stances": stances})
    return {
        "consensus": [cut(c.text) for c in majority],
        "contradictions": contradictions,
        "partial_coverage": [
            {"models": [m.name for m in c.members], "point": cut(c.text)} for c in shared
        ],
        "unique_insights": [],
        "blind_spots": [],
    }
