"""The package's public surface and the README's promises about it."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
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


def test_the_wheel_ships_templates_presets_migrations_and_the_trace_viewer(
    tmp_path: Path,
) -> None:
    """Build the wheel (hatchling, offline) and look inside: the data files the code opens at
    run time must be there, not only in the source tree."""
    built = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("openfusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {"openfusion/py.typed", "openfusion/data/prices.json"}
    for name in ("panel_system", "judge_analysis", "synthesis", "local_fewshot"):
        wanted.add(f"openfusion/prompts/{name}.j2")
    for name in ("local", "budget", "quality"):
        wanted.add(f"openfusion/presets/{name}.toml")
    wanted.add("openfusion/store/migrations/script.py.mako")
    for version in (ROOT / "src/openfusion/store/migrations/versions").glob("v*.py"):
        wanted.add(f"openfusion/store/migrations/versions/{version.name}")
    ui = ROOT / "src" / "openfusion" / "server" / "ui"
    for asset in [*(ui / "static").iterdir(), *(ui / "templates").iterdir()]:
        wanted.add(f"openfusion/server/ui/{asset.parent.name}/{asset.name}")
    assert len(wanted) > 15
    assert wanted <= names, sorted(wanted - names)
