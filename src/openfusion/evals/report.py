"""Writes an eval's report into its output directory, from the records alone.

``results.csv`` (one row per item and config, the latest record), ``summary.md`` and
``summary.csv`` (the tables), ``<table>-score-cost.png`` (score against cost, the Pareto
front marked) and ``<table>-latency.png`` per table, and ``report.html``: all of it in one
self-contained file (the plots embedded as data URIs). Every number in them comes from the
same ``summarise`` call, so they agree.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
from matplotlib.figure import Figure

from openfusion.evals.records import Record, write_atomic
from openfusion.evals.summary import Comparison, ConfigRow, Table, summarise

RESULT_COLUMNS = (
    "dataset", "item_id", "config", "kind", "grader", "grader_model", "run_id", "status",
    "score", "oracle", "cost", "grading_cost", "latency_ms", "tokens", "failures", "grade_error",
    "answer",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Report:
    tables: list[Table]
    files: list[Path]
    markdown: str


def money(value: float | None, digits: int = 4) -> str:
    return "?" if value is None else f"${value:.{digits}f}"


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def comparison_line(c: Comparison) -> str:
    low, high = c.ci
    if c.cost_ratio is not None:
        cost = f"cost x{c.cost_ratio:.2f}"
    else:
        cost = "cost ratio n/a (the single config cost $0 or an unknown amount)"
    return (
        f"{c.fused} vs {c.single}: Δ score {c.delta:+.1f} (95% CI {low:+.1f} to {high:+.1f}), "
        f"{cost}, on {c.n} items"
    )


def oracle(row: ConfigRow) -> str:
    """The fused row's oracle score (any panel member right), blank for the others."""
    return "" if row.oracle is None else f"{row.oracle:.1f}"


def _score(row: ConfigRow) -> tuple[str, str]:
    if row.score is None or row.ci is None:
        return "", ""
    return f"{row.score:.1f}", f"{row.ci[0]:.1f} to {row.ci[1]:.1f}"


def markdown_table(table: Table) -> str:
    head = (
        "| config | kind | n | score | 95% CI | oracle | cost | cost/item | p50 s | p95 s "
        "| failures |"
    )
    lines = [f"**{table.dataset}** · graded by {table.grader}", "", head, "|" + "---|" * 11]
    for row in table.rows:
        score, ci = _score(row)
        mark = " ◆" if row.config in table.pareto else ""
        lines.append(
            f"| {row.config}{mark} | {row.kind} | {row.n} | {score} | {ci} | {oracle(row)} "
            f"| {money(row.cost)} "
            f"| {money(row.cost_per_item, 6)} | {seconds(row.latency_p50)} "
            f"| {seconds(row.latency_p95)} | {row.failures} |"
        )
    axes = sorted({a for r in table.rows for a in r.axes})
    if axes:
        lines += ["", "| config | " + " | ".join(axes) + " |", "|" + "---|" * (len(axes) + 1)]
        for row in table.rows:
            cells = " | ".join(f"{row.axes[a]:.1f}" if a in row.axes else "" for a in axes)
            lines.append(f"| {row.config} | {cells} |")
    lines += [""] + [f"- {comparison_line(c)}" for c in table.comparisons]
    errors = sum(r.grading_errors for r in table.rows)
    if errors:
        lines.append(f"- {errors} answer(s) could not be graded (left out; a rerun grades them)")
    return "\n".join(lines).rstrip() + "\n"


def score_cost_png(table: Table) -> bytes:
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = figure.subplots()
    known = [r for r in table.rows if r.cost is not None and r.score is not None]
    for row in known:
        assert row.cost is not None and row.score is not None and row.ci is not None
        front = row.config in table.pareto
        ax.errorbar(
            row.cost,
            row.score,
            yerr=[[row.score - row.ci[0]], [row.ci[1] - row.score]],
            fmt="D" if front else "o",
            color="tab:red" if row.kind == "fused" else "tab:blue",
            markersize=8 if front else 6,
            capsize=3,
        )
    labels: dict[tuple[float, float], list[str]] = {}
    for row in known:  # configs on the same point share one label instead of overprinting
        assert row.cost is not None and row.score is not None
        labels.setdefault((row.cost, row.score), []).append(row.config)
    for (cost, score), names in labels.items():
        text = "\n".join(names)
        ax.annotate(text, (cost, score), textcoords="offset points", xytext=(6, 6), fontsize=8)
    line = sorted(
        (r.cost, r.score)
        for r in known
        if r.config in table.pareto
        if r.cost is not None and r.score is not None
    )
    if len(line) > 1:
        ax.plot([c for c, _ in line], [s for _, s in line], "--", color="gray")
    ax.set_xlabel("cost of all answers (USD)")
    ax.set_ylabel("score (0-100), 95% CI")
    ax.set_ylim(-5, 105)
    unknown = [r.config for r in table.rows if r.cost is None]
    note = "red: fused, blue: single; ◆ Pareto front"
    if unknown:
        note += f"; cost unknown: {', '.join(unknown)}"
    ax.set_title(f"{table.dataset} · {table.grader}\n{note}", fontsize=9)
    return _png(figure)


def latency_png(table: Table, records: Sequence[Record]) -> bytes:
    figure = Figure(figsize=(6.4, 0.6 + 0.5 * max(len(table.rows), 2)), dpi=110)
    ax = figure.subplots()
    names = [r.config for r in table.rows]
    data = [
        [
            r.latency_ms / 1000
            for r in records
            if r.config == name and r.dataset == table.dataset and _grader(r) == table.grader
        ]
        for name in names
    ]
    ax.boxplot(data, orientation="horizontal", tick_labels=names, showfliers=True)
    ax.invert_yaxis()  # the first config on top, as in the table
    ax.set_xlabel("seconds per answer")
    ax.set_title(f"{table.dataset} · latency", fontsize=9)
    figure.tight_layout()
    return _png(figure)


def _grader(record: Record) -> str:
    if record.grader == "rubric" and record.grader_model:
        return f"rubric by {record.grader_model}"
    return record.grader


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def results_csv(records: Sequence[Record]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(RESULT_COLUMNS)
    for r in records:
        row = r.to_dict()
        row["failures"] = "; ".join(r.failures)
        writer.writerow(["" if row[c] is None else row[c] for c in RESULT_COLUMNS])
    return out.getvalue()


def summary_csv(tables: Sequence[Table]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["dataset", "grader", "config", "kind", "n", "score", "ci_low", "ci_high", "oracle",
         "cost", "cost_per_item", "latency_p50_s", "latency_p95_s", "failures",
         "grading_errors", "pareto"]
    )  # fmt: skip
    for t in tables:
        for r in t.rows:
            ci = r.ci or (None, None)
            writer.writerow(
                [t.dataset, t.grader, r.config, r.kind, r.n, r.score, ci[0], ci[1], r.oracle,
                 r.cost, r.cost_per_item, r.latency_p50, r.latency_p95, r.failures,
                 r.grading_errors, r.config in t.pareto]
            )  # fmt: skip
    return out.getvalue()


def write_report(
    directory: Path,
    records: Sequence[Record],
    configs: Sequence[str],
    meta: dict[str, object],
) -> Report:
    """Write every report file; returns the tables and the files written."""
    tables = summarise(records, configs)
    files: list[Path] = []

    def put(name: str, content: str | bytes) -> None:
        write_atomic(directory / name, content)
        files.append(directory / name)

    ordered = sorted(records, key=lambda r: (r.dataset, r.item_id, configs.index(r.config)))
    put("results.csv", results_csv(ordered))
    markdown = "\n".join(markdown_table(t) for t in tables)
    put("summary.md", markdown)
    put("summary.csv", summary_csv(tables))
    images: dict[str, dict[str, str]] = {}
    for table in tables:
        plots = {"score_cost": score_cost_png(table), "latency": latency_png(table, records)}
        images[table.slug] = {}
        for kind, png in plots.items():
            put(f"{table.slug}-{kind.replace('_', '-')}.png", png)
            images[table.slug][kind] = base64.b64encode(png).decode("ascii")
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            tables=tables,
            images=images,
            records=ordered,
            meta=meta,
            created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            money=money,
            seconds=seconds,
            comparison_line=comparison_line,
            score=_score,
            oracle=oracle,
            detail=lambda r: json.dumps(r.detail, ensure_ascii=False)[:300],
        )
    )
    put("report.html", html)
    return Report(tables, files, markdown)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("openfusion", "evals"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
