"""run_code in bubblewrap: no network, no host files, bounded CPU, memory, processes, output."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from openfusion.errors import ConfigError
from openfusion.settings import Settings
from openfusion.tools import ToolError, ToolSettings, default_tools
from openfusion.tools.sandbox import Sandbox, SandboxConfig, format_run, resolve_mode

HAVE_BWRAP = shutil.which("bwrap") is not None and shutil.which("prlimit") is not None
needs_bwrap = pytest.mark.skipif(
    not HAVE_BWRAP,
    reason="bubblewrap (bwrap) or prlimit is not installed: apt-get install bubblewrap",
)


def sandbox(mode: str = "bwrap", **config: object) -> Sandbox:
    return Sandbox(SandboxConfig(mode=mode, **config))  # type: ignore[arg-type]


def processes_with(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@needs_bwrap
async def test_runs_python_and_shell() -> None:
    result = await sandbox().run("python", "import sys; print(sum(range(10))); sys.exit(3)")
    assert (result.exit_code, result.stdout, result.timed_out) == (3, "45\n", False)
    result = await sandbox().run("shell", "echo out; echo err >&2; pwd; id -u")
    assert result.exit_code == 0
    assert result.stdout.split() == [
        "out",
        "/tmp",
        "65534" if os.geteuid() == 0 else str(os.getuid()),
    ]
    assert result.stderr == "err\n"


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[str]]]:
    accepted: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append("connection")
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, accepted
    server.close()
    await server.wait_closed()


@needs_bwrap
async def test_no_network_not_even_host_loopback(listener: tuple[int, list[str]]) -> None:
    port, accepted = listener
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('blocked', type(exc).__name__)\n"
    )
    result = await sandbox().run("python", code)
    assert result.stdout.startswith("blocked"), result
    assert accepted == []
    # The same program outside the sandbox does reach the listener: the test can fail.
    weak = await sandbox("unsandboxed").run("python", code)
    assert weak.stdout == "connected\n"
    assert accepted == ["connection"]


@needs_bwrap
async def test_host_files_are_invisible_and_system_dirs_read_only(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o644)
    code = (
        "import os\n"
        f"for path in ({str(secret)!r}, '/root/.bashrc', '/etc/shadow', '/work'):\n"
        "    print(path, os.path.exists(path))\n"
        "for path in ('/usr/evil', '/etc/evil', '/evil'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print(path, 'written')\n"
        "    except OSError as exc:\n"
        "        print(path, exc.strerror)\n"
        "open('/tmp/ok', 'w').write('fine'); print(open('/tmp/ok').read())\n"
    )
    result = await sandbox().run("python", code)
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        f"{secret} False",
        "/root/.bashrc False",
        "/etc/shadow False",
        "/work False",
    ], result
    assert lines[4:7] == [
        "/usr/evil Read-only file system",
        "/etc/evil Read-only file system",
        "/evil Read-only file system",
    ]
    assert lines[7] == "fine"
    assert not os.path.exists("/usr/evil") and not os.path.exists("/etc/evil")  # noqa: ASYNC240


@needs_bwrap
async def test_fork_bomb_is_contained() -> None:
    marker = f"forkbomb-{random.randrange(10**9)}"
    counted = await sandbox(max_processes=16).run(
        "python",
        "import os, time\n"
        "n = 0\n"
        "for _ in range(500):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(n)\n",
    )
    assert 0 < int(counted.stdout) < 16, counted

    started = time.monotonic()
    result = await sandbox(timeout=2).run(
        "python",
        f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass\n",
    )
    assert result.timed_out
    assert time.monotonic() - started < 2 + 5
    await asyncio.sleep(0.2)
    assert processes_with(marker.encode()) == []


@needs_bwrap
async def test_memory_bomb_is_contained() -> None:
    result = await sandbox(memory_mb=128).run(
        "python", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 1024 * 1024))\n"
    )
    assert not result.timed_out
    assert "MemoryError" in result.stderr or (result.exit_code or 0) < 0, result


@needs_bwrap
async def test_endless_loop_is_killed_with_its_children() -> None:
    seconds = str(86_000 + random.randrange(400))
    code = f"sleep {seconds} &\necho started $!\nwhile true; do :; done\n"
    started = time.monotonic()
    result = await sandbox(timeout=1.5).run("shell", code)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code is None
    assert result.stdout.startswith("started")
    assert 1.4 < elapsed < 1.5 + 3
    await asyncio.sleep(0.2)
    assert processes_with(f"sleep\0{seconds}\0".encode()) == []
    assert "killed: still running after the 1.5 s limit" in format_run(result, 1.5)


@needs_bwrap
async def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENFUSION_TEST_SECRET", "hunter2")
    result = await sandbox().run("shell", "env")
    assert "hunter2" not in result.stdout
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines()}
    assert names <= {"PATH", "LANG", "HOME", "PWD"}
    assert "HOME=/tmp" in result.stdout.splitlines()


@needs_bwrap
async def test_output_is_capped() -> None:
    result = await sandbox(output_max_bytes=1000).run("python", "print('x' * 100_000)")
    assert result.stdout == "x" * 1000
    assert result.stdout_dropped == 100_001 - 1000
    assert "[stdout truncated: 99001 more bytes]" in format_run(result, 10)


async def test_oversized_program_is_refused() -> None:
    with pytest.raises(ToolError, match="longer than 10 chars"):
        await sandbox(max_code_chars=10).run("python", "print('far too long')")


@needs_bwrap
async def test_unsandboxed_mode_keeps_limits_env_and_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENFUSION_TEST_SECRET", "hunter2")
    weak = sandbox("unsandboxed", timeout=1, memory_mb=128)
    env = await weak.run("shell", "env; pwd")
    assert "hunter2" not in env.stdout
    assert env.stdout.splitlines()[-1].startswith("/tmp/openfusion-run-")
    memory = await weak.run("python", "b = bytearray(512 * 1024 * 1024)")
    assert "MemoryError" in memory.stderr
    seconds = str(87_000 + random.randrange(400))
    loop = await weak.run("shell", f"sleep {seconds} &\nwhile true; do :; done")
    assert loop.timed_out
    await asyncio.sleep(0.2)
    assert processes_with(f"sleep\0{seconds}\0".encode()) == []


@needs_bwrap
async def test_run_code_tool_through_the_registry(tmp_path: Path) -> None:
    settings = Settings(config_dir=tmp_path / "c", cache_dir=tmp_path / "k")
    tools = default_tools(settings, ToolSettings(code="auto", code_timeout=5))
    assert "run_code" in tools
    spec = next(s for s in tools.specs() if s.name == "run_code")
    assert spec.parameters["properties"]["language"]["enum"] == ["python", "shell"]
    assert "no network access" in spec.description
    result = await tools.call("run_code", '{"language": "python", "code": "print(6 * 7)"}')
    assert result.ok and result.cost == 0.0
    assert "exit code 0\n--- stdout ---\n42" in result.content
    assert "UNTRUSTED-DATA" in result.content
    bad = await tools.call("run_code", '{"language": "ruby", "code": "puts 1"}')
    assert bad.error is not None and "language" in bad.error


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def everything(name: str) -> str | None:
        return f"/usr/bin/{name}"

    def nothing(name: str) -> str | None:
        return None

    assert resolve_mode("auto", everything) == "bwrap"
    assert resolve_mode("auto", nothing) is None
    assert resolve_mode("off", everything) is None
    assert resolve_mode("unsandboxed", everything) == "unsandboxed"
    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        resolve_mode("bwrap", lambda name: None if name == "bwrap" else "/usr/bin/prlimit")

    settings = Settings(config_dir=tmp_path / "c", cache_dir=tmp_path / "k")
    monkeypatch.setattr(shutil, "which", nothing)
    assert "run_code" not in default_tools(settings, ToolSettings(code="auto"))
    monkeypatch.setattr(shutil, "which", everything)
    assert "run_code" in default_tools(settings, ToolSettings(code="auto"))
    assert "run_code" not in default_tools(settings, ToolSettings(code="off"))
