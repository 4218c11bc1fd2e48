"""What an eval asks: items (a prompt and what a good answer is) and the dataset they form.

The JSONL format, one item a line::

    {"id": "q1", "prompt": "Who wrote Emma?", "aliases": ["Jane Austen", "Austen"]}
    {"id": "q2", "prompt": "What is 6 * 7?", "answer": "42"}
    {"id": "q3", "prompt": "Largest planet?", "choices": ["Mars", "Jupiter"], "answer": "B"}
    {"id": "q4", "prompt": "Compare CRDTs and OT.",
     "rubric": [{"criterion": "Explains convergence", "weight": 5, "axis": "accuracy"},
                {"criterion": "Claims OT needs no server", "weight": -5, "axis": "accuracy"}]}

Each item carries exactly one kind of key (``answer``, ``aliases``, ``choices`` + ``answer``,
or ``rubric``); ``meta`` (any JSON object) is kept with the results. Which grader scores an
item follows from its key (see ``graders.grader_kind``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openfusion.errors import ConfigError
from openfusion.settings import describe_validation_error


@dataclass(frozen=True, slots=True)
class Criterion:
    """One rubric line. A negative ``weight`` marks an error the answer should not make."""

    criterion: str
    weight: float
    axis: str | None = None


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    prompt: str
    answer: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    rubric: tuple[Criterion, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Names this exact item: a rerun checks its finished results against it."""
        data = {
            "prompt": self.prompt,
            "answer": self.answer,
            "aliases": self.aliases,
            "choices": self.choices,
            "rubric": [(c.criterion, c.weight, c.axis) for c in self.rubric],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    items: tuple[Item, ...]
    description: str = ""
    deny_hosts: tuple[str, ...] = ()
    """Hosts the tools may not read during this dataset's run (where its answers are posted)."""


class _Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    criterion: str = Field(min_length=1)
    weight: float
    axis: str | None = None


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | int
    prompt: str = Field(min_length=1)
    answer: str | int | float | None = None
    aliases: list[str] | None = None
    choices: list[str] | None = None
    rubric: list[_Criterion] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> _Item:
        if self.choices is not None and self.answer is None:
            raise ValueError("an item with choices needs the correct one as answer")
        kinds = [self.aliases is not None, self.rubric is not None, self.answer is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of answer, aliases, choices + answer, or rubric")
        if self.rubric is not None and not any(c.weight > 0 for c in self.rubric):
            raise ValueError("a rubric needs at least one criterion with a positive weight")
        if self.aliases is not None and not any(a.strip() for a in self.aliases):
            raise ValueError("aliases is empty")
        return self

    def to_item(self) -> Item:
        return Item(
            id=str(self.id),
            prompt=self.prompt,
            answer=None if self.answer is None else str(self.answer),
            aliases=tuple(self.aliases or ()),
            choices=tuple(self.choices or ()),
            rubric=tuple(Criterion(c.criterion, c.weight, c.axis) for c in self.rubric or ()),
            meta=self.meta,
        )


def parse_item(data: Any, where: str) -> Item:
    try:
        return _Item.model_validate(data).to_item()
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from exc


def read_jsonl(path: Path) -> list[Any]:
    """The JSON values of a JSONL file, one a line (blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return values


def load_jsonl(path: Path) -> Dataset:
    """A dataset in openfusion's JSONL format (see the module docstring)."""
    items = [parse_item(row, f"{path}:{n}") for n, row in enumerate(read_jsonl(path), 1)]
    return Dataset(path.stem, unique(items, str(path)))


def unique(items: list[Item], where: str) -> tuple[Item, ...]:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise ConfigError(f"{where}: item id {item.id!r} appears twice")
        seen.add(item.id)
    if not items:
        raise ConfigError(f"{where}: no items")
    return tuple(items)
