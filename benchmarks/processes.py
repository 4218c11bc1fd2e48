"""Servers the benchmarks start: pinned to a core, their port read back, their CPU and memory
read from /proc (the whole process tree: uvicorn's ``--workers`` are children), stopped at the
end with everything they started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server in a process group of its own, so stopping it stops what it started too."""

    name: str
    proc: subprocess.Popen[str]
    log: Path
    url: str = ""
    """``http://127.0.0.1:PORT`` once known."""
    _log_file: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        name: str,
        command: list[str],
        *,
        cpu: int | None,
        log: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Server:
        """Run ``command`` pinned to ``cpu`` (``taskset``), stderr to ``log``. Without ``port``
        the server prints its port as its first line of stdout."""
        pinned = ["taskset", "-c", str(cpu), *command] if cpu is not None else command
        log_file = log.open("w")
        proc = subprocess.Popen(
            pinned,
            stdout=subprocess.PIPE if port is None else log_file,
            stderr=log_file,
            text=True,
            env=env,
            start_new_session=True,
        )
        server = cls(name, proc, log, _log_file=log_file)
        if port is None:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if not line.isdigit():
                server.stop()
                raise RuntimeError(f"{name} did not start: {server.tail()}")
            port = int(line)
        server.url = f"http://127.0.0.1:{port}"
        return server

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_bytes(self) -> int:
        return rss_bytes(self.pids())

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " / ".join(text[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the group this server leads (start_new_session)


def wait_until(ready: bool, server: Server, deadline: float) -> None:
    """Raise if ``server`` died or ``deadline`` passed before it was ``ready``."""
    if ready:
        return
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} exited ({server.proc.returncode}): {server.tail()}")
    if time.monotonic() > deadline:
        raise RuntimeError(f"{server.name} was not ready in time: {server.tail()}")


def process_tree(root: int) -> list[int]:
    """``root`` and every process under it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(_stat_fields(stat)[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of the live processes ``pids``."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds per live thread of ``pid`` (its main thread's id is ``pid``)."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = _stat_fields((task / "stat").read_text())
        except OSError:
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _stat_fields(stat: str) -> list[str]:
    """``/proc/PID/stat`` from its third field (state) on: the name may hold spaces."""
    return stat[stat.rindex(")") + 2 :].split()
