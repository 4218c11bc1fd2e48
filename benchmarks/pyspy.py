"""py-spy on a running server, and a ranking of where its CPU went.

``record`` samples a process (and its threads) into py-spy's "raw" format: one line per
distinct stack, ``frame;frame;...;frame COUNT``, each frame ``function (file:line)``. That file
opens in speedscope or flamegraph.pl as it is. ``summarise`` ranks functions by samples in them
(self) and under them (inclusive), and packages by self samples.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def executable() -> str:
    """py-spy's command, next to this Python's or on PATH."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


async def record(
    pid: int, seconds: float, output: Path, *, cpu: int | None, rate: int = 100
) -> None:
    """Sample ``pid`` for ``seconds`` without pausing it (blocking sampling of a server with
    a dozen threads cut its throughput by 5x); threads py-spy sees as idle are left out."""
    command = [executable(), "record", "--pid", str(pid), "--rate", str(rate)]
    command += ["--duration", str(max(1, round(seconds))), "--format", "raw", "--threads"]
    command += ["--output", str(output)]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed ({proc.returncode}): {stderr.decode()[-500:]}")


def where(file: str) -> str:
    """A short name for a source file: from the package on (``starlette/routing.py``)."""
    for marker in ("site-packages/", "/src/", "lib/python3."):
        if marker in file:
            tail = file.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "lib/python3." else tail
    return file


def package(file: str) -> str:
    """``openfusion.server``, ``starlette``, ``asyncio``... for a source file."""
    parts = where(file).removesuffix(".py").split("/")
    if parts[0] == "openfusion" and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def summarise(raw: Path, top: int = 25) -> list[str]:
    """The main thread's (event loop's) samples ranked; other threads' samples only counted.

    py-spy cannot tell a thread that waits inside a C call (aiosqlite's, in SQLite's busy
    handler or in fsync) from one that computes, so other threads' samples are not CPU."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    others: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        n = int(count)
        if not thread.endswith(": MainThread"):
            others[thread.split(": ", 1)[-1].split(" ", 1)[-1]] += n
            continue
        total += n
        parsed = [m for m in map(FRAME.match, frames) if m is not None]
        if not parsed:
            continue
        names = [f"{m['function']} ({where(m['file'])})" for m in parsed]
        self_samples[names[-1]] += n
        packages[package(parsed[-1]["file"])] += n
        for name in set(names):
            inclusive[name] += n
    if not total:
        return ["no samples of the main thread"]

    def ranked(counter: Counter[str], limit: int) -> list[str]:
        return [f"  {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(limit)]

    waiting = ", ".join(f"{name} {n}" for name, n in others.most_common(3))
    lines = [f"main thread: {total} samples; other threads (not CPU): {waiting or 'none'}"]
    lines += ["main thread, self, by package:", *ranked(packages, 15)]
    lines += ["main thread, self, by function:", *ranked(self_samples, top)]
    lines += ["main thread, inclusive, by function:", *ranked(inclusive, 2 * top)]
    return lines
