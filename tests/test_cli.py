"""The ``openfusion`` command line, on a scripted provider configured in a config dir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import ANALYSIS

from openfusion.cli import main


@pytest.fixture
def demo_config() -> Path:
    """A config dir with a scripted provider ``demo`` and a preset ``demo`` that uses it."""
    config = Path(os.environ["OPENFUSION_CONFIG_DIR"])
    (config / "presets").mkdir(parents=True)
    script: dict[str, Any] = {
        "a": {"content": "Jane Austen.", "cost": 0.001},
        "b": {"content": "Austen, in 1813.", "cost": 0.002},
        "c": {"content": "It was Jane Austen.", "cost": 0.003},
        "down": {"status": 503, "error": "upstream overloaded"},
        "judge": [{"content": json.dumps(ANALYSIS)}, {"content": "Jane Austen wrote it, in 1813."}],
    }
    (config / "script.json").write_text(json.dumps(script))
    (config / "config.toml").write_text(
        f'[providers.demo]\ntype = "scripted"\noptions.script = "{config / "script.json"}"\n'
        "[retries]\nbase_delay = 0.01\n"
    )
    (config / "presets" / "demo.toml").write_text(
        'description = "scripted demo"\njudge = "demo/judge"\n'
        'panel = [{ model = "demo/a" }, { model = "demo/b" }, { model = "demo/c" }]\n'
    )
    return config


def test_ask_streams_the_answer_and_reports_progress(demo_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "--preset", "demo", "Who wrote P&P?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "Jane Austen wrote it, in 1813.\n"
    for line in ("demo/a: done", "demo/b: done", "demo/c: done", "judge · analysis: done"):
        assert line in result.stderr
    assert "3/3 panel answered" in result.stderr
    assert "$0.0060" in result.stderr


def test_ask_json_has_the_full_result(demo_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "-p", "demo", "--json", "Who wrote P&P?"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "ok"
    assert len(data["responses"]) == 3
    assert set(data["analysis"]) == set(ANALYSIS)
    assert data["usage"]["cost"] == pytest.approx(0.006)
    assert data["usage"]["total_tokens"] == (
        data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    )
    assert data["content"] == "Jane Austen wrote it, in 1813."


def test_ask_with_panel_and_judge_flags(demo_config: Path) -> None:
    result = CliRunner().invoke(
        main, ["ask", "--panel", "demo/a,demo/down", "--judge", "demo/judge", "--json", "q"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["model"] for r in data["responses"]] == ["demo/a"]
    assert data["failed_models"][0]["message"] == "upstream overloaded"
    assert data["failed_models"][0]["tries"] == 3  # retried: 503 is worth another try
    assert "upstream overloaded" in result.stderr


def test_show_analysis(demo_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "-p", "demo", "--show-analysis", "q"])
    assert result.exit_code == 0, result.output
    assert "analysis" in result.stderr
    assert "published 1813" in result.stderr


def test_all_members_failed_exits_1_with_reasons(demo_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "--panel", "demo/down,demo/down", "q"])
    assert result.exit_code == 1
    assert "all_panels_failed" in result.stderr
    assert "upstream overloaded" in result.stderr


def test_question_from_stdin(demo_config: Path) -> None:
    result = CliRunner().invoke(main, ["ask", "-p", "demo", "-"], input="Who wrote P&P?\n")
    assert result.exit_code == 0, result.output
    assert "Jane Austen" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "-p", "nope", "q"], "unknown preset 'nope'"),
        (["ask", "-p", "budget", "q"], "OPENROUTER_API_KEY"),
        (["ask", "--panel", "justamodel", "q"], "must look like 'provider/model'"),
        (["ask", "  "], "the question is empty"),
        (["ask", "--temperature", "9", "q"], "--temperature"),
    ],
)
def test_bad_input_gets_a_clear_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_models_lists_presets_and_providers(demo_config: Path) -> None:
    result = CliRunner().invoke(main, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("local (default)", "budget", "quality", "demo", "self:<model>"):
        assert text in result.stdout
    assert "OPENROUTER_API_KEY not set" in result.stdout


def test_serve_refuses_a_public_address_without_keys() -> None:
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 1
    assert "openfusion keys create" in result.stderr
    assert "--insecure-no-auth" in result.stderr
