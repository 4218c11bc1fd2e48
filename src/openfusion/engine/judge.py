"""The judge's analysis: anonymise the answers, ask for the analysis JSON, validate it.

The judge sees "Response A, B, C" in a shuffled order (to cut position bias) and never the model
names; once its analysis validates, labels are mapped back to panel member names.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from openfusion.engine.result import MemberResponse


@dataclass(frozen=True, slots=True)
class LabelledResponse:
    label: str
    content: str
    member: MemberResponse


def anonymise(responses: Sequence[MemberResponse], rng: random.Random) -> list[LabelledResponse]:
    """Shuffle the answers and label them "Response A", "Response B", ... in the new order."""
    order = list(responses)
    rng.shuffle(order)
    return [
        LabelledResponse(f"Response {letter}", r.content, r)
        for letter, r in zip(string.ascii_uppercase, order, strict=False)
    ]


def analysis_schema(
    labels: Sequence[str], max_items: int = 5, max_chars: int = 300
) -> dict[str, Any]:
    """The JSON schema of the analysis, with model fields limited to the response labels.

    The bounds keep constrained decoding from running on (a small model repeats itself inside
    an unbounded string until it runs out of tokens, and the JSON is cut).
    """
    text = {"type": "string", "maxLength": max_chars}
    label = {"type": "string", "enum": list(labels)}

    def items(schema: dict[str, Any]) -> dict[str, Any]:
        return {"type": "array", "items": schema, "maxItems": max_items}

    def obj(**props: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }

    return obj(
        consensus=items(text),
        contradictions=items(obj(topic=text, stances=items(obj(model=label, stance=text)))),
        partial_coverage=items(obj(models=items(label), point=text)),
        unique_insights=items(obj(model=label, insight=text)),
        blind_spots=items(text),
    )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Stance(_Strict):
    model: str
    stance: str


class Contradiction(_Strict):
    topic: str
    stances: list[Stance]


class PartialCoverage(_Strict):
    models: list[str]
    point: str


class UniqueInsight(_Strict):
    model: str
    insight: str


class Analysis(_Strict):
    """The contract's five keys and shapes, exactly: a missing or an extra key is an error."""

    consensus: list[str]
    contradictions: list[Contradiction]
    partial_coverage: list[PartialCoverage]
    unique_insights: list[UniqueInsight]
    blind_spots: list[str]


class AnalysisError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_analysis(text: str, labelled: Sequence[LabelledResponse]) -> dict[str, Any]:
    """Validate the judge's reply and map labels back to member names.

    Raises ``AnalysisError`` with reason ``judge_empty_completion``, ``judge_not_valid_json`` or
    ``judge_schema_mismatch`` (wrong shape, a key too many or too few, or a model named by
    something that is not one of the panel's labels).
    """
    body = _strip_fences(text)
    if not body:
        raise AnalysisError("judge_empty_completion", "the judge returned no analysis")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise AnalysisError("judge_not_valid_json", f"analysis is not JSON: {exc}") from exc
    try:
        analysis = Analysis.model_validate(data)
    except ValidationError as exc:
        raise AnalysisError(
            "judge_schema_mismatch", f"analysis has the wrong shape: {exc}"
        ) from exc
    names = {item.label: item.member.name for item in labelled}

    def name(label: str) -> str:
        key = label.strip()
        if not key.startswith("Response "):
            key = f"Response {key}"  # "A" for "Response A"
        if key not in names:
            raise AnalysisError(
                "judge_schema_mismatch",
                f"analysis names {label!r}, which is not a panel label ({', '.join(names)})",
            )
        return names[key]

    for contradiction in analysis.contradictions:
        for stance in contradiction.stances:
            stance.model = name(stance.model)
    for partial in analysis.partial_coverage:
        partial.models = [name(m) for m in partial.models]
    for insight in analysis.unique_insights:
        insight.model = name(insight.model)
    return analysis.model_dump()


def _strip_fences(text: str) -> str:
    """Accept ```json fenced replies from models that were only asked for JSON in the prompt."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    return body.strip()
