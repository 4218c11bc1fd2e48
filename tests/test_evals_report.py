"""The report's numbers (bootstrap CI, paired Δ, Pareto front) and its files agreeing."""

from __future__ import annotations

import base64
import csv
import io
import math
import re
from pathlib import Path

import pytest

from openfusion.evals import Record, summarise, write_report
from openfusion.evals.summary import ConfigRow, bootstrap_ci, pareto


def record(
    config: str,
    item: int,
    score: float,
    cost: float | None,
    *,
    kind: str = "fused",
    latency: int = 1000,
    dataset: str = "toy",
    status: str = "ok",
) -> Record:
    return Record(
        dataset=dataset, item_id=f"q{item}", item_digest="d", config=config, kind=kind,
        grader="numeric", run_id=f"{config}-{item}", status=status, answer=f"answer {item}",
        score=score, cost=cost, latency_ms=latency,
    )  # fmt: skip


def test_bootstrap_ci_of_a_constant_is_the_constant() -> None:
    assert bootstrap_ci([70.0] * 20) == (70.0, 70.0)
    assert bootstrap_ci([55.0]) == (55.0, 55.0)


def test_bootstrap_ci_matches_the_normal_interval_of_a_proportion() -> None:
    scores = [100.0] * 200 + [0.0] * 200  # p = 0.5, n = 400: 1.96 * sqrt(p(1-p)/n) = 4.9 points
    low, high = bootstrap_ci(scores)
    half = 1.96 * math.sqrt(0.25 / 400) * 100
    assert low == pytest.approx(50 - half, abs=0.8)
    assert high == pytest.approx(50 + half, abs=0.8)
    assert bootstrap_ci(scores) == (low, high)  # seeded: the same report every time
    assert (
        bootstrap_ci(scores[:40] + scores[-40:])[1] - bootstrap_ci(scores[:40] + scores[-40:])[0]
        > 2 * half
    )


def test_pareto_front_drops_configs_beaten_on_both() -> None:
    def row(name: str, score: float, cost: float | None) -> ConfigRow:
        return ConfigRow(name, "fused", 10, score, (score, score), cost, 1.0, 1.0, 0, 0)

    rows = [
        row("cheap", 50, 0.1),
        row("best", 70, 1.0),
        row("worse", 60, 2.0),
        row("tie", 50, 0.1),
        row("unknown", 99, None),
    ]
    assert pareto(rows) == ("cheap", "best", "tie")


def test_fused_vs_single_is_paired_with_its_cost_ratio() -> None:
    records = [record("fused", n, s, 0.04) for n, s in enumerate([100, 100, 0, 100])]
    records += [record("solo", n, s, 0.01, kind="single") for n, s in enumerate([0, 100, 0])]
    (table,) = summarise(records, ["fused", "solo"])
    (line,) = table.comparisons
    assert (line.fused, line.single, line.n) == ("fused", "solo", 3)  # only items both answered
    assert line.delta == pytest.approx(100 / 3)
    assert line.cost_ratio == pytest.approx(4.0)
    fused = table.rows[0]
    assert (fused.n, fused.score, fused.cost, fused.cost_per_item) == (
        4,
        75.0,
        pytest.approx(0.16),
        pytest.approx(0.04),
    )


def test_graders_and_datasets_never_share_a_table() -> None:
    records = [record("a", 1, 100, 0.0), record("a", 2, 0, 0.0, dataset="other")]
    records.append(
        Record(
            dataset="toy",
            item_id="q9",
            item_digest="d",
            config="a",
            kind="fused",
            grader="rubric",
            run_id="x",
            status="ok",
            answer="",
            score=40.0,
            cost=0.0,
            latency_ms=1,
            grader_model="openrouter/google/gemini-3-pro",
        )
    )
    tables = summarise(records, ["a"])
    assert sorted((t.dataset, t.grader) for t in tables) == [
        ("other", "numeric"),
        ("toy", "numeric"),
        ("toy", "rubric by openrouter/google/gemini-3-pro"),
    ]


def test_report_files_agree_with_each_other(tmp_path: Path) -> None:
    records = [record("local", n, 100.0 * (n % 2), 0.0, latency=30_000 + n) for n in range(6)]
    records += [
        record("local/gemma", n, 100.0 * (n % 3 == 0), 0.0, kind="single", latency=2_000)
        for n in range(6)
    ]
    records.append(record("local/gemma", 6, 0.0, 0.0, kind="single", status="error"))
    meta: dict[str, object] = {
        "datasets": ["toy"],
        "configs": ["local", "local/gemma"],
        "grader_model": None,
        "tools": False,
        "max_cost": None,
        "spent": 0.0,
        "not_run": 0,
    }
    report = write_report(tmp_path, records, ["local", "local/gemma"], meta)
    names = sorted(p.name for p in report.files)
    assert names == [
        "report.html",
        "results.csv",
        "summary.csv",
        "summary.md",
        "toy-numeric-latency.png",
        "toy-numeric-score-cost.png",
    ]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert len(rows) == len(records)
    summary = {
        r["config"]: r for r in csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text()))
    }
    for config in ("local", "local/gemma"):
        mine = [float(r["score"]) for r in rows if r["config"] == config]
        assert float(summary[config]["score"]) == pytest.approx(sum(mine) / len(mine))
    assert summary["local/gemma"]["failures"] == "1"
    assert float(summary["local"]["latency_p50_s"]) == pytest.approx(30.0025)
    markdown = (tmp_path / "summary.md").read_text()
    assert f"| local | fused | 6 | {float(summary['local']['score']):.1f} |" in markdown.replace(
        " ◆", ""
    )
    assert "local vs local/gemma: Δ score" in markdown
    html = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2
    for image, name in zip(
        images, ("toy-numeric-score-cost.png", "toy-numeric-latency.png"), strict=True
    ):
        assert base64.b64decode(image) == (tmp_path / name).read_bytes()
        assert base64.b64decode(image).startswith(b"\x89PNG")
    assert "local vs local/gemma: Δ score" in html
    assert "<script" not in html and "http" not in html.split("<body>")[1]  # self-contained
