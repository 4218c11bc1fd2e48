"""The rubric grader: an LLM decides MET or UNMET for each criterion; weights make the score.

score = Σ weights of the criteria MET / Σ positive weights * 100, clamped to 0-100, overall
and per axis. A criterion with a negative weight describes a mistake: when the answer makes
it (MET), its weight is subtracted. Criteria go to the grader in batches, each one call with a
JSON schema (one key per criterion id, "MET" or "UNMET"), so structured output is enforced
where the model supports it. Calls go through the ``Caller`` (retries, fallbacks, pricing,
the eval's budget); an answer that does not parse, or leaves a criterion out, is asked again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from openfusion.engine.budget import Budget
from openfusion.engine.citations import without_sources
from openfusion.engine.policy import Caller
from openfusion.errors import ProviderError
from openfusion.evals.graders import Grade
from openfusion.evals.items import Criterion, Item
from openfusion.prompts import PromptSet
from openfusion.types import CompletionRequest, Message, Usage

VERDICTS = ("MET", "UNMET")
BATCH = 20
"""Criteria per grader call."""
ATTEMPTS = 3
"""Calls per batch before its grade counts as failed (a bad reply is asked again)."""
TOKENS_PER_CRITERION = 16


def rubric_score(
    criteria: Sequence[Criterion], met: Sequence[bool]
) -> tuple[float, dict[str, float]]:
    """The score (0-100) and the score per axis for these verdicts."""

    def score(pairs: list[tuple[Criterion, bool]]) -> float | None:
        positive = sum(c.weight for c, _ in pairs if c.weight > 0)
        if positive <= 0:
            return None
        gained = sum(c.weight for c, hit in pairs if hit)
        return min(100.0, max(0.0, 100.0 * gained / positive))

    pairs = list(zip(criteria, met, strict=True))
    axes: dict[str, float] = {}
    for axis in dict.fromkeys(c.axis for c in criteria if c.axis):
        value = score([(c, hit) for c, hit in pairs if c.axis == axis])
        if value is not None:
            axes[axis] = value
    overall = score(pairs)
    assert overall is not None  # items are checked to have a positive criterion
    return overall, axes


def verdict_schema(ids: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {i: {"type": "string", "enum": list(VERDICTS)} for i in ids},
        "required": list(ids),
        "additionalProperties": False,
    }


class RubricGrader:
    """Grades rubric items with ``model``; one grader model per comparison."""

    def __init__(
        self,
        caller: Caller,
        model: str,
        prompts: PromptSet,
        *,
        batch: int = BATCH,
        attempts: int = ATTEMPTS,
    ) -> None:
        self.caller = caller
        self.model = model
        self.prompts = prompts
        self.batch = batch
        self.attempts = attempts

    async def grade(self, item: Item, answer: str, budget: Budget | None = None) -> Grade:
        criteria = item.rubric
        starts = range(0, len(criteria), self.batch)
        outcomes = await asyncio.gather(
            *(self._batch(item, answer, criteria, s, budget) for s in starts)
        )
        usage = Usage()
        verdicts: dict[str, bool] = {}
        errors: list[str] = []
        for batch_verdicts, batch_usage, error in outcomes:
            usage += batch_usage
            verdicts.update(batch_verdicts)
            if error:
                errors.append(error)
        if errors:
            return Grade(None, cost=usage.cost, error="; ".join(errors))
        met = [verdicts[f"c{i + 1}"] for i in range(len(criteria))]
        score, axes = rubric_score(criteria, met)
        detail = {
            "grader": self.model,
            "criteria": [
                {"criterion": c.criterion, "weight": c.weight, "axis": c.axis, "met": hit}
                for c, hit in zip(criteria, met, strict=True)
            ],
        }
        return Grade(score, axes, detail, cost=usage.cost)

    async def _batch(
        self,
        item: Item,
        answer: str,
        criteria: Sequence[Criterion],
        start: int,
        budget: Budget | None,
    ) -> tuple[dict[str, bool], Usage, str | None]:
        ids = [f"c{i + 1}" for i in range(start, min(start + self.batch, len(criteria)))]
        prompt = self.prompts.render(
            "eval_rubric",
            question=item.prompt,
            answer=without_sources(answer) or "(no answer)",
            criteria=[{"id": i, "text": criteria[int(i[1:]) - 1].criterion} for i in ids],
        )
        request = CompletionRequest(
            model="",
            messages=(Message("user", prompt),),
            temperature=0.0,
            max_tokens=TOKENS_PER_CRITERION * len(ids) + 32,
            json_schema=verdict_schema(ids),
        )
        usage = Usage()
        problem = ""
        for _ in range(self.attempts):
            try:
                call = await self.caller.complete([self.model], request, budget)
            except ProviderError as exc:
                return {}, usage, f"grader {self.model}: {exc.reason}: {exc.message}"
            usage += call.completion.usage
            verdicts, problem = parse_verdicts(call.completion.content, ids)
            if verdicts is not None:
                return verdicts, usage, None
        return {}, usage, f"grader {self.model}: {problem} (after {self.attempts} tries)"


def parse_verdicts(text: str, ids: Sequence[str]) -> tuple[dict[str, bool] | None, str]:
    """``{id: met}`` for every id, or ``None`` and what was wrong with the reply."""
    start, end = text.find("{"), text.rfind("}")
    try:
        data = json.loads(text[start : end + 1]) if start != -1 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return None, "the reply is not a JSON object"
    verdicts: dict[str, bool] = {}
    for i in ids:
        value = str(data.get(i, "")).strip().upper()
        if value not in VERDICTS:
            return None, f"no MET/UNMET verdict for criterion {i}"
        verdicts[i] = value == "MET"
    return verdicts, ""
