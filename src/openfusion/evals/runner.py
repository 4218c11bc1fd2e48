"""Runs every item on every config, grades the answers, and records each as it finishes.

Items go item by item (every config answers item 1 before item 2 starts, up to ``concurrency``
answers at once; with several datasets, item 1 of each, then item 2 of each), so a run stopped
early still compares the configs on the same items of every dataset. ``max_cost`` is one budget
for the whole output directory, results already there included: a call that could overrun it is
not started, and once one is refused no new item starts (the answer it cut short is not
recorded, so a rerun with more budget redoes it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from openfusion.engine.budget import Budget
from openfusion.engine.fusion import tool_settings
from openfusion.engine.policy import Caller
from openfusion.errors import ConfigError
from openfusion.evals.configs import Answer, Answerer, EvalConfig
from openfusion.evals.graders import LETTERS, RULE_GRADERS, Grade, grader_kind
from openfusion.evals.items import Dataset, Item
from openfusion.evals.records import Key, Manifest, Record, RunStore
from openfusion.evals.rubric import RubricGrader
from openfusion.prompts import PromptSet
from openfusion.providers import ProviderRegistry
from openfusion.settings import Settings
from openfusion.tools import ToolRegistry, default_tools


@dataclass(frozen=True, slots=True)
class EvalPlan:
    datasets: Sequence[Dataset]
    configs: Sequence[EvalConfig]
    output: Path
    grader_model: str | None = None
    """The rubric grader's model id (needed when any item has a rubric)."""
    concurrency: int = 1
    max_cost: float | None = None
    tools: bool = True
    """``False``: no config gets tools (the engine's ``tools: []``)."""
    temperature: float | None = None
    """Sent with every question, as a client's request would (a fused config keeps its
    panel's spread above it); ``None``: each config's own."""


@dataclass(frozen=True, slots=True)
class Outcome:
    records: dict[Key, Record]
    """The latest record per (dataset, item, config): earlier sessions' included."""
    spent: float
    stopped_by_budget: bool
    not_run: int
    """Answers not made (``--max-cost`` was reached)."""


OnRecord = Callable[[Record, float], None]
"""Called with each record as it is written, and the spend so far (USD)."""


class EvalRunner:
    def __init__(self, plan: EvalPlan, settings: Settings, *, caller: Caller | None = None) -> None:
        if plan.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1")
        self.plan = plan
        self.settings = settings
        self._owns_registry = caller is None
        self.caller = caller or Caller.from_settings(ProviderRegistry(settings), settings)
        self.prompts = PromptSet(settings.prompt_dirs)
        rubric = any(grader_kind(i) == "rubric" for d in plan.datasets for i in d.items)
        if rubric and not plan.grader_model:
            raise ConfigError(
                "this dataset is graded by a rubric: name the grader model with --grader "
                "(e.g. --grader openrouter/google/gemini-3-pro, or local/gemma-3-270m offline); "
                "it stays fixed for every config compared"
            )
        self.grader = (
            RubricGrader(self.caller, plan.grader_model, self.prompts)
            if plan.grader_model
            else None
        )
        self.answerers: dict[tuple[str, str], Answerer] = {}
        for dataset in plan.datasets:
            tools = self._tools(dataset)
            for config in plan.configs:
                answerer = Answerer(config, settings, self.caller, tools, plan.temperature)
                answerer.check()
                self.answerers[(dataset.name, config.name)] = answerer
        if self.grader is not None:
            self.caller.registry.resolve(self.grader.model)
        self.store = RunStore(plan.output)

    def _tools(self, dataset: Dataset) -> ToolRegistry | None:
        """The built-in tools, with the dataset's own hosts denied to them."""
        if not self.plan.tools:
            return None
        ts = tool_settings(self.settings)
        deny = tuple(dict.fromkeys([*ts.deny_hosts, *dataset.deny_hosts]))
        return default_tools(self.settings, ts.model_copy(update={"deny_hosts": deny}))

    def manifest(self) -> Manifest:
        return Manifest(
            {c.name: c.fingerprint for c in self.plan.configs},
            [d.name for d in self.plan.datasets],
            self.plan.grader_model,
        )

    async def run(self, on_record: OnRecord = lambda record, spent: None) -> Outcome:
        _, records = self.store.open(self.manifest())
        self._check_items(records)
        prior = sum((r.cost or 0.0) + (r.grading_cost or 0.0) for r in records.values())
        budget = (
            Budget(self.plan.max_cost, spent=prior, fit_output=False)
            if self.plan.max_cost
            else None
        )
        limit = asyncio.Semaphore(self.plan.concurrency)
        stop = asyncio.Event()
        if budget is not None and budget.remaining <= 0:
            stop.set()
        not_run = 0

        async def one(dataset: Dataset, item: Item, config: EvalConfig) -> None:
            nonlocal not_run
            async with limit:
                if stop.is_set():
                    not_run += 1
                    return
                key = (dataset.name, item.id, config.name)
                done = records.get(key)
                if done is not None:  # answered, but its grading failed: grade it again
                    record = await self._regrade(done, item, budget)
                else:
                    answerer = self.answerers[(dataset.name, config.name)]
                    answer = await answerer.answer(self._question(item), budget)
                    if answer.budget_cut:
                        stop.set()
                        not_run += 1
                        return
                    record = await self._record(dataset, item, config, answer, budget)
                if record.grade_error and "budget" in record.grade_error:
                    stop.set()
                self.store.append(record)
                records[key] = record
                on_record(record, budget.spent if budget else _spent(records))

        try:
            async with asyncio.TaskGroup() as group:
                for dataset, item in _interleaved(self.plan.datasets):
                    for config in self.plan.configs:
                        done = records.get((dataset.name, item.id, config.name))
                        if done is None or done.score is None:
                            group.create_task(one(dataset, item, config))
        finally:
            if self._owns_registry:
                await self.caller.registry.aclose()
        spent = budget.spent if budget else _spent(records)
        return Outcome(records, spent, stop.is_set() and not_run > 0, not_run)

    def _check_items(self, records: dict[Key, Record]) -> None:
        items = {(d.name, i.id): i for d in self.plan.datasets for i in d.items}
        for record in records.values():
            item = items.get((record.dataset, record.item_id))
            if item is not None and item.digest != record.item_digest:
                raise ConfigError(
                    f"item {record.item_id} of {record.dataset} differs from the one these "
                    "results answered (the dataset changed): use another --output"
                )

    def _question(self, item: Item) -> str:
        choices = [{"letter": LETTERS[i], "text": c} for i, c in enumerate(item.choices)]
        return self.prompts.render("eval_question", prompt=item.prompt, choices=choices)

    async def _grade(self, item: Item, answer: str, budget: Budget | None) -> Grade:
        kind = grader_kind(item)
        if kind == "rubric":
            assert self.grader is not None
            return await self.grader.grade(item, answer, budget)
        return RULE_GRADERS[kind](item, answer)

    async def _record(
        self,
        dataset: Dataset,
        item: Item,
        config: EvalConfig,
        answer: Answer,
        budget: Budget | None,
    ) -> Record:
        kind = grader_kind(item)
        if answer.status == "error":
            grade = Grade(0.0, detail={"no_answer": True})
        else:
            grade = await self._grade(item, answer.content, budget)
        oracle = None
        if answer.panel and kind != "rubric":
            graded = [RULE_GRADERS[kind](item, content).score for content in answer.panel]
            oracle = max((s for s in graded if s is not None), default=None)
        return Record(
            dataset=dataset.name,
            item_id=item.id,
            item_digest=item.digest,
            config=config.name,
            kind=config.kind,
            grader=kind,
            run_id=answer.run_id,
            status=answer.status,
            answer=answer.content,
            score=grade.score,
            cost=answer.usage.cost,
            latency_ms=answer.latency_ms,
            tokens=answer.usage.total_tokens,
            grading_cost=grade.cost,
            failures=answer.failures,
            axes=grade.axes,
            detail=grade.detail,
            grade_error=grade.error,
            grader_model=self.grader.model if kind == "rubric" and self.grader else None,
            oracle=oracle,
        )

    async def _regrade(self, done: Record, item: Item, budget: Budget | None) -> Record:
        grade = await self._grade(item, done.answer, budget)
        earlier = done.grading_cost
        cost = None if earlier is None or grade.cost is None else earlier + grade.cost
        return dataclasses.replace(
            done,
            score=grade.score,
            axes=grade.axes,
            detail=grade.detail,
            grade_error=grade.error,
            grading_cost=cost,
        )


def _interleaved(datasets: Sequence[Dataset]) -> list[tuple[Dataset, Item]]:
    """Item 1 of every dataset, then item 2 of every dataset...: a run stopped early has
    results on each dataset."""
    longest = max((len(d.items) for d in datasets), default=0)
    return [(d, d.items[n]) for n in range(longest) for d in datasets if n < len(d.items)]


def _spent(records: dict[Key, Record]) -> float:
    return sum((r.cost or 0.0) + (r.grading_cost or 0.0) for r in records.values())
