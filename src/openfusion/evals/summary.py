"""The numbers of a report: per config, per (dataset, grader) table; fused-vs-single lines.

Scores from different graders never share a table: one table per dataset and grader (the
rubric grader's model included). A score's 95% confidence interval is a percentile bootstrap
of the item mean (10,000 resamples, seeded, so a report is reproducible); a fused-vs-single
Δ is bootstrapped over the items both answered (paired). An item a config failed to answer
scores 0 and counts as a failure; an item whose grading failed is left out of the mean and
counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from openfusion.evals.records import Record

RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True, slots=True)
class ConfigRow:
    config: str
    kind: str
    n: int
    score: float | None
    ci: tuple[float, float] | None
    cost: float | None
    """USD for every answer (``None`` when some cost is unknown)."""
    latency_p50: float | None
    """Seconds per answer."""
    latency_p95: float | None
    failures: int
    """Items this config gave no answer to (scored 0)."""
    grading_errors: int
    axes: dict[str, float] = field(default_factory=dict)
    oracle: float | None = None
    """A fused config: mean of the best panel answer's score (``Record.oracle``)."""

    @property
    def cost_per_item(self) -> float | None:
        return None if self.cost is None or not self.n else self.cost / self.n


@dataclass(frozen=True, slots=True)
class Comparison:
    fused: str
    single: str
    n: int
    """Items both answered and had graded."""
    delta: float
    ci: tuple[float, float]
    cost_ratio: float | None
    """Fused cost / single cost on those items (``None``: unknown, or the single was free)."""


@dataclass(frozen=True, slots=True)
class Table:
    dataset: str
    grader: str
    rows: tuple[ConfigRow, ...]
    comparisons: tuple[Comparison, ...]
    pareto: tuple[str, ...]
    """Configs no other config beats on both score and cost."""

    @property
    def slug(self) -> str:
        text = f"{self.dataset}-{self.grader}".lower()
        return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")


def bootstrap_ci(values: Sequence[float], seed: int = SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        mean = float(data.mean()) if len(data) else 0.0
        return mean, mean
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(RESAMPLES, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _total(costs: Sequence[float | None]) -> float | None:
    return None if any(c is None for c in costs) else float(sum(c for c in costs if c))


def _row(config: str, records: list[Record]) -> ConfigRow:
    graded = [r for r in records if r.score is not None]
    scores = [r.score for r in graded if r.score is not None]
    latencies = np.asarray([r.latency_ms / 1000 for r in records], dtype=float)
    axes: dict[str, float] = {}
    for axis in dict.fromkeys(a for r in graded for a in r.axes):
        values = [r.axes[axis] for r in graded if axis in r.axes]
        axes[axis] = float(np.mean(values))
    oracles = [r.oracle for r in graded if r.oracle is not None]
    return ConfigRow(
        config=config,
        kind=records[0].kind,
        n=len(graded),
        score=float(np.mean(scores)) if scores else None,
        ci=bootstrap_ci(scores) if scores else None,
        cost=_total([r.cost for r in records]),
        latency_p50=float(np.percentile(latencies, 50)) if len(latencies) else None,
        latency_p95=float(np.percentile(latencies, 95)) if len(latencies) else None,
        failures=sum(r.status == "error" for r in records),
        grading_errors=len(records) - len(graded),
        axes=axes,
        oracle=float(np.mean(oracles)) if oracles else None,
    )


def compare(fused: list[Record], single: list[Record]) -> Comparison | None:
    theirs = {r.item_id: r for r in single if r.score is not None}
    pairs = [(r, theirs[r.item_id]) for r in fused if r.score is not None and r.item_id in theirs]
    if not pairs:
        return None
    diffs = [a.score - b.score for a, b in pairs if a.score is not None and b.score is not None]
    fused_cost = _total([a.cost for a, _ in pairs])
    single_cost = _total([b.cost for _, b in pairs])
    ratio = fused_cost / single_cost if fused_cost is not None and single_cost else None
    return Comparison(
        fused[0].config,
        single[0].config,
        len(pairs),
        float(np.mean(diffs)),
        bootstrap_ci(diffs),
        ratio,
    )


def pareto(rows: Sequence[ConfigRow]) -> tuple[str, ...]:
    known = [r for r in rows if r.cost is not None and r.score is not None]

    def beaten(r: ConfigRow) -> bool:
        assert r.cost is not None and r.score is not None
        return any(
            o.cost is not None
            and o.score is not None
            and o.cost <= r.cost
            and o.score >= r.score
            and (o.cost < r.cost or o.score > r.score)
            for o in known
        )

    return tuple(r.config for r in known if not beaten(r))


def summarise(records: Sequence[Record], configs: Sequence[str]) -> list[Table]:
    """One table per (dataset, grader), configs in the order given."""
    groups: dict[tuple[str, str], dict[str, list[Record]]] = {}
    for record in records:
        grader = record.grader
        if record.grader == "rubric" and record.grader_model:
            grader = f"rubric by {record.grader_model}"
        by_config = groups.setdefault((record.dataset, grader), {})
        by_config.setdefault(record.config, []).append(record)
    tables = []
    for (dataset, grader), by_config in groups.items():
        order = [c for c in configs if c in by_config] + sorted(set(by_config) - set(configs))
        rows = tuple(_row(c, by_config[c]) for c in order)
        comparisons = []
        for fused in (c for c in order if by_config[c][0].kind == "fused"):
            for single in (c for c in order if by_config[c][0].kind == "single"):
                line = compare(by_config[fused], by_config[single])
                if line is not None:
                    comparisons.append(line)
        tables.append(Table(dataset, grader, rows, tuple(comparisons), pareto(rows)))
    return tables
