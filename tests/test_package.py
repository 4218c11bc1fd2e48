"""The package's public surface and the README's promises about it."""

from __future__ import annotations

import re
from pathlib import Path

import openfusion

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_are_sorted_and_importable() -> None:
    assert openfusion.__all__ == sorted(openfusion.__all__)
    for name in openfusion.__all__:
        assert getattr(openfusion, name) is not None


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"```sh\n(python3 -m venv .*)\n```", readme)
    assert len(commands) == 2, "README should open with the two set-up commands"
    assert "openfusion ask" in commands[0]
    assert commands[1] in ci.splitlines()


def test_package_ships_templates_and_presets() -> None:
    src = ROOT / "src" / "openfusion"
    assert (src / "py.typed").exists()
    for name in ("panel_system", "judge_analysis", "synthesis", "local_fewshot"):
        assert (src / "prompts" / f"{name}.j2").exists()
    for name in ("local", "budget", "quality"):
        assert (src / "presets" / f"{name}.toml").exists()
