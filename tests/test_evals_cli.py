"""``openfusion eval`` end to end on a scripted provider configured in the config dir."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ANALYSIS

from openfusion.cli import main


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A scripted provider ``demo`` (panel a, b; judge; a single model ``solo``), a preset
    ``demo`` over it, and a three-item dataset."""
    config = Path(os.environ["OPENFUSION_CONFIG_DIR"])
    (config / "presets").mkdir(parents=True)
    script = {
        "a": {"content": "Paris, I believe.", "cost": 0.001},
        "b": {"content": "Lyon?", "cost": 0.001},
        "judge": {
            "json": {"content": json.dumps(ANALYSIS), "cost": 0.001},
            "text": {"content": "Paris.", "cost": 0.002},
        },
        "solo": {"content": "Marseille.", "cost": 0.0005},
    }
    (config / "script.json").write_text(json.dumps(script))
    (config / "config.toml").write_text(
        f'[providers.demo]\ntype = "scripted"\noptions.script = "{config / "script.json"}"\n'
    )
    (config / "presets" / "demo.toml").write_text(
        'judge = "demo/judge"\npanel = [{ model = "demo/a" }, { model = "demo/b" }]\n'
    )
    items = tmp_path / "capitals.jsonl"
    rows = [
        {"id": "fr", "prompt": "Capital of France?", "aliases": ["Paris"]},
        {"id": "it", "prompt": "Capital of Italy?", "aliases": ["Rome", "Roma"]},
        {"id": "n", "prompt": "How many moons has Mars?", "answer": 2},
    ]
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return items


def test_eval_writes_every_report_file(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["eval", "-d", str(demo), "-c", "demo,demo/solo", "-o", str(out), "--no-tools"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "graded by alias" in result.stdout and "graded by numeric" in result.stdout
    assert "demo vs demo/solo: Δ score +50.0" in result.stdout  # Paris right, Rome wrong, both
    for name in ("results.jsonl", "results.csv", "summary.md", "summary.csv", "report.html"):
        assert (out / name).is_file(), name
    assert (out / "capitals-alias-score-cost.png").read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(rows) == 6
    assert {(r["item_id"], r["config"], r["score"]) for r in rows if r["item_id"] == "fr"} == {
        ("fr", "demo", "100.0"),
        ("fr", "demo/solo", "0.0"),
    }
    # a rerun has nothing left to do: the same results, no new lines
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_eval_errors_say_what_to_do(demo: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["eval", "-c", "demo"])
    assert missing.exit_code == 2 and "give --dataset and --configs" in missing.output
    unknown = runner.invoke(main, ["eval", "-d", "nope", "-c", "demo"])
    assert unknown.exit_code == 1 and "unknown dataset 'nope'" in unknown.output
    bad = runner.invoke(main, ["eval", "-d", str(demo), "-c", "nosuchpreset", "-o", str(tmp_path)])
    assert bad.exit_code == 1 and "unknown preset 'nosuchpreset'" in bad.output


def test_list_datasets() -> None:
    result = CliRunner().invoke(main, ["eval", "--list-datasets"])
    assert result.exit_code == 0, result.output
    for name in ("draco:PATH", "triviaqa", "freshqa", "reasoning-gym:NAME", "writingbench"):
        assert name in result.stdout
