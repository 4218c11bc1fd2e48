"""``run_code``: run a model's Python or shell program in a sandbox.

Threat model
------------
The code is hostile: written by a model that may be following instructions injected by a web
page. It must not reach the network, read or change the host's files, outlive its call, or
starve the host. Two modes:

``bwrap`` (bubblewrap; the default when installed). The program runs in fresh user, PID,
network, IPC, UTS and cgroup namespaces (``--unshare-all``), with no further user namespaces
allowed inside (``--disable-userns``):

* network: a new network namespace holds only its own loopback device. Nothing on the host,
  not even the host's 127.0.0.1, is reachable;
* files: the root is an empty, read-only tmpfs; ``/usr`` (and the ``/bin``, ``/lib*``,
  ``/sbin`` links into it) and a few files of ``/etc`` for the dynamic loader are bound
  read-only; ``/tmp`` is a private, size-capped tmpfs and the working directory; ``/proc``
  shows only the sandbox's processes and ``/dev`` only the harmless devices. Home folders,
  ``/etc/shadow``, the project, the caller's secrets are simply not there;
* identity: when openfusion runs as root, the program runs as ``nobody`` (uid 65534), so
  nothing inside is the host's root. Inside its user namespace a process may hold capabilities,
  but only over objects of that namespace; to the host kernel it stays unprivileged ``nobody``
  (that is also what makes ``RLIMIT_NPROC`` count: the kernel does not enforce it for root);
* resources: rlimits set before the sandbox starts (by ``prlimit``) cap CPU seconds, address
  space (``code_memory_mb``), file size, open files and processes, so fork and memory bombs
  fail inside; a wall-clock timeout kills the process group, and with it bubblewrap, whose
  death takes down the PID namespace and every process in it (``--die-with-parent``);
  ``--new-session`` stops it from injecting keystrokes into a terminal (TIOCSTI);
* environment: only ``PATH``, ``LANG`` and ``HOME=/tmp``; no API key or other variable of the
  caller gets in. Output is read up to a cap and the rest discarded.

Not contained: kernel bugs reachable from an unprivileged user namespace (the sandbox shares
the host kernel), CPU side channels (Spectre-class leaks of other processes' memory), bugs in
bubblewrap itself, and CPU and memory bandwidth use within the limits. Host files under
``/usr`` are readable, as they are to any local user. For hostile multi-tenant use put the
whole service in a VM.

``unsandboxed`` (an operator's explicit opt-in; weaker): the same rlimits, timeout, process
group kill, ``nobody`` identity (when run as root), scrubbed environment and a private
temporary working directory, but no namespaces: the program can reach the network and read any
file ``nobody`` may read, and a process that starts its own session escapes the group kill.

``off``, or ``auto`` without bubblewrap: ``run_code`` is not offered at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from openfusion.errors import ConfigError
from openfusion.tools.base import Tool, ToolError, ToolOutput
from openfusion.tools.settings import CodeMode

SandboxMode = Literal["bwrap", "unsandboxed"]
Language = Literal["python", "shell"]

NOBODY = 65534
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
INTERPRETERS: dict[str, tuple[str, ...]] = {
    "python": ("python3", "-I", "-c"),
    "shell": ("sh", "-c"),
}
_LOADER_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
)
_SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
KILL_GRACE = 2.0
"""Seconds to wait for the output pipes to close once the process group is dead."""


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    mode: SandboxMode = "bwrap"
    timeout: float = 10.0
    memory_mb: int = 256
    file_size_mb: int = 10
    tmpfs_mb: int = 64
    max_processes: int = 32
    max_open_files: int = 256
    output_max_bytes: int = 8000
    """Per stream (stdout, stderr); the rest is read and discarded."""
    max_code_chars: int = 100_000


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int | None
    """``None`` when the program was killed at the timeout; negative: killed by that signal."""
    stdout: str
    stderr: str
    stdout_dropped: int = 0
    """Bytes of output past the cap, read and discarded."""
    stderr_dropped: int = 0
    timed_out: bool = False


def resolve_mode(
    setting: CodeMode, which: Callable[[str], str | None] | None = None
) -> SandboxMode | None:
    """The sandbox to use for ``[tools] code``, or ``None`` when ``run_code`` is off."""
    which = which or shutil.which
    have_bwrap = which("bwrap") is not None
    have_prlimit = which("prlimit") is not None
    if setting == "off" or (setting == "auto" and not (have_bwrap and have_prlimit)):
        return None
    if not have_prlimit:
        raise ConfigError(
            f"code = {setting!r} needs prlimit (util-linux) to set resource limits: install "
            'it, or set code = "off" under [tools] in config.toml'
        )
    if setting in ("auto", "bwrap"):
        if not have_bwrap:
            raise ConfigError(
                'code = "bwrap" needs bubblewrap: `apt-get install bubblewrap`, or set '
                'code = "off" under [tools] in config.toml'
            )
        return "bwrap"
    return "unsandboxed"


class Sandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config

    def _limits(self) -> list[str]:
        c = self.config
        cpu = int(c.timeout) + 1  # the wall-clock timeout comes first; this backs it up
        return [
            shutil.which("prlimit") or "prlimit",
            f"--cpu={cpu}",
            f"--as={c.memory_mb * 1024 * 1024}",
            f"--fsize={c.file_size_mb * 1024 * 1024}",
            f"--nproc={_process_limit(c.max_processes)}",
            f"--nofile={c.max_open_files}",
            "--core=0",
            "--",
        ]

    def _bwrap(self) -> list[str]:
        args = [
            shutil.which("bwrap") or "bwrap",
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "sandbox",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for name in _SYSTEM_DIRS:
            path = Path("/", name)
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        for file in _LOADER_FILES:
            args += ["--ro-bind-try", file, file]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(self.config.tmpfs_mb * 1024 * 1024),
            "--tmpfs",
            "/tmp",
            "--chdir",
            "/tmp",
            "--remount-ro",
            "/",
            "--",
        ]
        return args

    def command(self, language: Language, code: str) -> list[str]:
        program = [*INTERPRETERS[language], code]
        if self.config.mode == "bwrap":
            return [*self._limits(), *self._bwrap(), *program]
        return [*self._limits(), *program]

    async def run(self, language: Language, code: str) -> RunResult:
        if len(code) > self.config.max_code_chars:
            raise ToolError(f"the program is longer than {self.config.max_code_chars} chars")
        if "\0" in code:
            raise ToolError("the program contains a NUL character")
        workdir = await asyncio.to_thread(_make_workdir, self.config.mode)
        try:
            return await self._run(self.command(language, code), workdir)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def _run(self, argv: list[str], workdir: Path) -> RunResult:
        home = "/tmp" if self.config.mode == "bwrap" else str(workdir)
        as_root = os.geteuid() == 0
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home},
                cwd=workdir,
                start_new_session=True,
                user=NOBODY if as_root else None,
                group=NOBODY if as_root else None,
                extra_groups=[] if as_root else None,
            )
        except OSError as exc:
            raise ToolError(f"the sandbox could not start: {exc}") from exc
        assert proc.stdout is not None and proc.stderr is not None
        out, err = _Capture(self.config.output_max_bytes), _Capture(self.config.output_max_bytes)
        readers = [
            asyncio.ensure_future(out.drain(proc.stdout)),
            asyncio.ensure_future(err.drain(proc.stderr)),
        ]
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), self.config.timeout)
            except TimeoutError:
                timed_out = True
        finally:
            _kill_group(proc.pid)  # also ends background children of a program that exited
            await proc.wait()
            _, pending = await asyncio.wait(readers, timeout=KILL_GRACE)
            for task in pending:
                task.cancel()
        return RunResult(
            exit_code=None if timed_out else proc.returncode,
            stdout=out.text(),
            stderr=err.text(),
            stdout_dropped=out.dropped,
            stderr_dropped=err.dropped,
            timed_out=timed_out,
        )


class _Capture:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            room = self.limit - len(self.kept)
            self.kept += chunk[:room]
            self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, signal.SIGKILL)


def _process_limit(max_processes: int) -> int:
    """RLIMIT_NPROC for the sandbox. As root the program runs as ``nobody``, which owns no other
    process; as any other user the limit counts that user's processes too, so add them."""
    if os.geteuid() == 0:
        return max_processes
    uid = os.getuid()
    own = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                own += 1
        except OSError:
            continue
    return own + max_processes


def _make_workdir(mode: SandboxMode) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="openfusion-run-"))
    if mode == "bwrap":
        return workdir  # only the host-side cwd; the program sees its own tmpfs
    if os.geteuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)
    return workdir


def format_run(result: RunResult, timeout: float) -> str:
    if result.timed_out:
        status = f"killed: still running after the {timeout:g} s limit"
    elif result.exit_code is not None and result.exit_code < 0:
        status = f"killed by signal {signal.Signals(-result.exit_code).name}"
    else:
        status = f"exit code {result.exit_code}"
    parts = [status]
    for name, text, dropped in (
        ("stdout", result.stdout, result.stdout_dropped),
        ("stderr", result.stderr, result.stderr_dropped),
    ):
        if text or dropped:
            parts.append(f"--- {name} ---\n{text.rstrip()}")
            if dropped:
                parts.append(f"[{name} truncated: {dropped} more bytes]")
    return "\n".join(parts)


Code = Annotated[str, Field(min_length=1, description="The whole program.")]
CodeLanguage = Annotated[Language, Field(description="python (Python 3) or shell (POSIX sh).")]


def run_code_tool(sandbox: Sandbox) -> Tool:
    config = sandbox.config
    where = (
        "in a sandbox with no network access and a private, empty /tmp as working directory"
        if config.mode == "bwrap"
        else "WITHOUT a sandbox (only resource limits; the network may be reachable) in a "
        "private temporary working directory"
    )

    async def run_code(language: CodeLanguage, code: Code) -> ToolOutput:
        result = await sandbox.run(language, code)
        return ToolOutput(text=format_run(result, config.timeout), cost=0.0)

    description = (
        "Run a short Python 3 or POSIX shell program and return its exit code, stdout and "
        f"stderr. It runs {where}, discarded afterwards, with a limit of {config.timeout:g} s "
        f"and {config.memory_mb} MB. Use it to compute or check things; print what you need."
    )
    return Tool.from_function(run_code, description=description, price=0.0)
