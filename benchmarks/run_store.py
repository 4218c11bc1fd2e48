"""What recording runs costs: the library and `openfusion ask`, recording on and off.

A scripted panel (two members and a judge that answer at once, no network), so the numbers are
openfusion's own time:

- ``library``: ``--runs`` fusions in one ``async with Fusion(...)``, each timed from ``run()``
  to its result (recording writes in the background; what is left is flushed at the close,
  timed separately as ``close``);
- ``ask``: ``openfusion ask`` as a process, start to exit (imports, the store's start, the run,
  the flush), ``--cli-runs`` times each way, on a store that already exists (the first run ever
  also creates the database: shown as ``ask (new db)``).

Everything lives in a temporary config and data dir.

    python benchmarks/run_store.py [--runs 200] [--cli-runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openfusion import Fusion, Preset, Settings
from openfusion.providers import ProviderRegistry
from openfusion.providers.scripted import ScriptedProvider, Step

ANALYSIS = {
    "consensus": ["Jane Austen wrote Emma"],
    "contradictions": [],
    "partial_coverage": [],
    "unique_insights": [],
    "blind_spots": [],
}
SCRIPT = {
    "a": {"content": "Jane Austen.", "cost": 0.001},
    "b": {"content": "Austen, 1815.", "cost": 0.002},
    "judge": {
        "json": {"content": json.dumps(ANALYSIS), "cost": 0.0004},
        "text": {"content": "Jane Austen wrote Emma.", "cost": 0.0005},
    },
}


async def library(settings: Settings, runs: int, record: bool) -> tuple[list[float], float]:
    registry = ProviderRegistry(settings)
    registry.register("demo", ScriptedProvider({k: _step(v) for k, v in SCRIPT.items()}))
    preset = Preset.from_models(["demo/a", "demo/b"], "demo/judge")
    fusion = Fusion(
        preset, settings=settings, registry=registry, **({} if record else {"recorder": None})
    )
    times = []
    async with fusion:
        for _ in range(runs):
            started = time.perf_counter()
            await fusion.run("Who wrote Emma?")
            times.append(time.perf_counter() - started)
        closing = time.perf_counter()
    return times, time.perf_counter() - closing


def _step(value: dict[str, object]) -> object:
    if "json" in value:
        json_step, text_step = Step(**value["json"]), Step(**value["text"])  # type: ignore[arg-type]
        return lambda request: json_step if request.json_schema is not None else text_step
    return Step(**value)  # type: ignore[arg-type]


def ask(env: dict[str, str], record: bool) -> float:
    flag = "--record" if record else "--no-record"
    command = [sys.executable, "-c", "from openfusion.cli import main; main()", "ask", flag]
    started = time.perf_counter()
    subprocess.run(
        [*command, "--panel", "demo/a,demo/b", "--judge", "demo/judge", "Who wrote Emma?"],
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "config"
        config.mkdir()
        (config / "script.json").write_text(json.dumps(SCRIPT))
        (config / "config.toml").write_text(
            f'[providers.demo]\ntype = "scripted"\noptions.script = "{config / "script.json"}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENFUSION_")}
        env |= {
            "OPENFUSION_CONFIG_DIR": str(config),
            "OPENFUSION_DATA_DIR": str(root / "data"),
            "OPENFUSION_CACHE_DIR": str(root / "cache"),
        }
        rows = [("ask (new db)", "on", [ask(env, True)], None)]
        for record in (True, False):
            times = [ask(env, record) for _ in range(args.cli_runs)]
            rows.append(("ask", "on" if record else "off", times, None))
        settings = Settings.load(env)
        for record in (True, False):
            times, close = asyncio.run(library(settings, args.runs, record))
            rows.append(("library", "on" if record else "off", times, close))
    print(f"{'what':<13} {'record':>6} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'close ms':>9}")
    for what, record, times, close in rows:
        p50 = statistics.median(times) * 1000
        p99 = sorted(times)[min(len(times) - 1, int(len(times) * 0.99))] * 1000
        closed = "" if close is None else f"{close * 1000:.1f}"
        print(f"{what:<13} {record:>6} {len(times):>5} {p50:>8.1f} {p99:>8.1f} {closed:>9}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="library runs each way")
    parser.add_argument("--cli-runs", type=int, default=5, help="openfusion ask processes each way")
    main(parser.parse_args())
