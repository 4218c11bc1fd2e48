"""openfusion, LiteLLM and the Python floor side by side: one command, one machine, one table.

Starts, in one process tree, all on 127.0.0.1:

- the mock upstream (``tests/upstream_mock.py``, no delay; models ``a``, ``b``, ``c``, ``judge``,
  ``s`` for streams and ``slow-*`` that take ``--slow`` seconds);
- the floor: ``benchmarks/floor_proxy.py``, a bare aiohttp pass-through proxy;
- LiteLLM's proxy: ``litellm[proxy]`` from PyPI, installed on the first run into its own
  virtualenv under ``--litellm-venv`` and reused after, one worker, pointed at the mock by a
  config with ``api_base`` (if it cannot be installed or started, its row says why);
- ``openfusion serve`` as shipped (SQLite ledger in a temporary config dir, provider ``mock``),
  and for (f) the same with ``--workers 2`` and with the ledger on PostgreSQL (a database of
  its own, dropped at the end).

Gateways are pinned to ``--gateway-cpu``, the mock and the load (this process) to
``--load-cpu`` (``taskset``). Measured:

- (a) pass-through added latency at concurrency 1: each call through the gateway is paired
  with a direct call to the mock; added = p50 (p99) of the gateway's minus the direct one's;
- (b) fusion orchestration overhead (``openfusion/bench``: a 3-member panel and a judge, five
  upstream calls, three in sequence): end to end minus three direct calls (p50), at
  concurrency 1 (paired with direct calls) and at 256 (direct calls also at 256);
- (c) requests per second and gateway CPU ms per request at concurrency 64, one worker;
- (d) capacity: ``--capacity`` fusion requests at once with every upstream call taking
  ``--slow`` seconds: errors, when the last answer came, the gateway's peak RSS;
- (e) streams (``s``: 68 chunks) at concurrency 1, paired with direct streams: added time to
  the first content chunk, added total, the gap between content chunks;
- (f) (a), (b), (c) and (e) for each ``--variants`` entry (pinned to the same one core);
  ``no-ledger`` is the app with a ledger that records nothing: what the ledger costs;
- ``--baseline REV``: openfusion as it was at git revision ``REV`` (checked out into a
  temporary worktree, imported ahead of this checkout), beside this checkout's in the same run:
  what a change moved, with the machine's noise cancelled as far as one run can.

Every measurement runs ``--rounds`` times, the gateways in a new order each round, so a noisy
neighbour hits them all alike; a cell gives the value over all rounds pooled and, in brackets,
the range of the per-round values. The load average is printed at the start and the end.

    pip install -e '.[bench]'
    python benchmarks/gateways.py             # < 15 min on a busy 2-core machine (+ LiteLLM's
                                              # install on the first run, ~4 min)
    python benchmarks/gateways.py --quick     # one round, shorter cells: < 4 min
    python benchmarks/gateways.py --no-litellm --variants   # floor and openfusion only

``--profile DIR`` runs openfusion alone under the (c) load instead, pass-through, streamed and
fusion, with py-spy attached: its raw stacks go to DIR (speedscope and flamegraph.pl read
them), a ranking of the event loop's time and the CPU per request of each thread are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import platformdirs
import uvloop
from measure import Bench, Target, complete, log, session
from processes import Server, free_port, thread_cpu_seconds, wait_until
from pyspy import record, summarise
from report import details, goals, loadavg, machine_facts, table
from server_throughput import ANALYSIS_JSON, UNSAFE_ENV, NullRecorder, NullStore

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Jane Austen wrote Emma."
STREAM_TEXT = "Emma, by Jane Austen, came out in December 1815; its heroine is Emma Woodhouse. " * 3
"""Streamed by the mock in 4-character chunks: 68 content chunks."""
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
VARIANTS = {
    "workers2": (2, "sqlite"),
    "postgres": (1, "postgres"),
    "workers2+postgres": (2, "postgres"),
    "no-ledger": (1, "none"),
}
"""(f): name -> (workers, ledger). ``no-ledger`` is not a way to run openfusion: the same app
with a ledger that records nothing, to show what the ledger costs."""


# -- the mock upstream (its own process) ------------------------------------------------------


def serve_mock(slow: float) -> None:
    """Serve the mock upstream; print its port, run until terminated."""
    sys.path.insert(0, str(ROOT / "tests"))
    from upstream_mock import MockUpstream, Reply

    def judge(delay: float) -> Callable[[Any], Reply]:
        def reply(body: Any) -> Reply:
            analysis = isinstance(body, dict) and "response_format" in body
            return Reply(ANALYSIS_JSON if analysis else ANSWER, delay=delay)

        return reply

    async def main() -> None:
        async with MockUpstream(Reply(ANSWER), record=False, backlog=4096) as up:
            up.replies["s"] = Reply(STREAM_TEXT)
            up.replies["judge"] = judge(0.0)
            up.replies["slow-judge"] = judge(slow)
            for member in "abc":
                up.replies[f"slow-{member}"] = Reply(ANSWER, delay=slow)
            print(up.base_url.split(":")[-1].split("/")[0], flush=True)
            await asyncio.Event().wait()

    uvloop.run(main())


# -- the gateways -----------------------------------------------------------------------------


def serve_without_ledger(port: int) -> None:
    """``openfusion serve`` (one worker) with a store that keeps nothing (no spend ledger, no
    run records)."""
    import uvicorn

    from openfusion.server.app import create_app
    from openfusion.server.protocol import uvicorn_options
    from openfusion.settings import Settings

    settings = Settings.load()
    app = create_app(settings, store=NullStore(), recorder=NullRecorder(), tune_gc=True)  # type: ignore[arg-type]
    limits = uvicorn_options(
        settings.server.max_header_bytes, settings.server.header_timeout_seconds
    )
    uvicorn.run(  # as `openfusion serve` runs it, its request-head limits included
        app, port=port, loop="uvloop", log_level="info", access_log=False, **limits
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without keys or a user's ledger URL, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in UNSAFE_ENV}
    return {**env, **extra}


def start_openfusion(
    name: str,
    workers: int,
    database_url: str | None,
    mock: Server,
    tmp: Path,
    cpu: int | None,
    *,
    ledger: bool = True,
    source: Path | None = None,
) -> Server:
    config_dir = tmp / name.replace(" ", "_")
    (config_dir / "presets").mkdir(parents=True)
    database = f'database_url = "{database_url}"\n' if database_url else ""
    (config_dir / "config.toml").write_text(
        f'default_preset = "bench"\n{database}\n[providers.mock]\ntype = "openai_compat"\n'
        f'base_url = "{mock.url}/v1"\napi_key_env = ""\n'
        '\n[server]\nmodels = ["mock/*"]\n'  # pass-through and stream models, not in a preset
    )
    for preset, prefix in (("bench", ""), ("slow", "slow-")):
        panel = ", ".join(f'{{ model = "mock/{prefix}{m}" }}' for m in "abc")
        (config_dir / "presets" / f"{preset}.toml").write_text(
            f'description = "benchmark panel"\njudge = "mock/{prefix}judge"\npanel = [{panel}]\n'
        )
    env = clean_env(
        OPENFUSION_CONFIG_DIR=str(config_dir),
        OPENFUSION_CACHE_DIR=str(config_dir / "cache"),
        OPENFUSION_DATA_DIR=str(config_dir / "data"),  # the store: not the user's
        **({"PYTHONPATH": str(source)} if source else {}),  # another revision's package
    )
    port = free_port()
    command = [sys.executable, "-c", "from openfusion.cli import main; main()", "serve"]
    command += ["--port", str(port), "--workers", str(workers)]
    if not ledger:
        command = [sys.executable, __file__, "--serve-without-ledger", str(port)]
    log = tmp / f"{config_dir.name}.log"
    return Server.start(name, command, cpu=cpu, log=log, env=env, port=port)


def litellm_executable(venv: Path, spec: str) -> Path:
    """LiteLLM's ``litellm`` command, installed into ``venv`` first if it is not there."""
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing {spec} into {venv} (first run only; a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log = venv / "install.log"
    with log.open("w") as out:
        pip = [str(venv / "bin" / "pip"), "install", spec]
        if subprocess.run(pip, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"pip install {spec} failed; see {log}")
    return exe


def start_litellm(venv: Path, spec: str, mock: Server, tmp: Path, cpu: int | None) -> Server:
    exe = litellm_executable(venv, spec)
    entries = "".join(
        f"  - model_name: mock/{m}\n    litellm_params:\n      model: openai/{m}\n"
        f"      api_base: {mock.url}/v1\n      api_key: unused\n"
        for m in ("a", "s")
    )
    config = tmp / "litellm.yaml"
    config.write_text(f"model_list:\n{entries}")
    port = free_port()
    command = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--num_workers", "1"]
    # No network here: the price map LiteLLM ships, not the one it would download. No master
    # key: no auth, like openfusion without API keys (LiteLLM refuses that unless told).
    env = clean_env(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
    )
    return Server.start("LiteLLM", command, cpu=cpu, log=tmp / "litellm.log", env=env, port=port)


def litellm_version(venv: Path) -> str:
    python = venv / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or "?"


async def create_database(admin_url: str) -> str:
    """A fresh PostgreSQL database for one gateway's ledger; its name."""
    name = f"openfusion_bench_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def wait_ready(session: aiohttp.ClientSession, target: Target, seconds: float) -> None:
    """Until a real chat completion through ``target`` succeeds."""
    assert target.server is not None
    deadline = time.monotonic() + seconds
    while True:
        try:
            await complete(session, target.endpoint, target.body("a"))
            return
        except (aiohttp.ClientError, RuntimeError):
            wait_until(False, target.server, deadline)
            await asyncio.sleep(0.2)


# -- main -------------------------------------------------------------------------------------


class Gateways:
    """The servers of one run, started in order and stopped (databases dropped) on exit."""

    def __init__(self, args: argparse.Namespace, stack: AsyncExitStack, tmp: Path) -> None:
        self.args = args
        self.stack = stack
        self.tmp = tmp
        self.targets: list[Target] = []
        self.litellm_version: str | None = None
        command = [sys.executable, __file__, "--serve-mock", "--slow", str(args.slow)]
        self.mock = Server.start("mock", command, cpu=args.load_cpu, log=tmp / "mock.log")
        stack.callback(self.mock.stop)

    def add(self, name: str, start: Callable[[], Server], **kwargs: Any) -> None:
        """Start a gateway; one that fails to start gets a row saying why."""
        try:
            server = start()
        except Exception as exc:
            log(f"{name} not run: {exc}")
            self.targets.append(Target(name, None, broken=str(exc)[:200], **kwargs))
            return
        self.stack.callback(server.stop)
        self.targets.append(Target(name, server, **kwargs))

    def floor(self) -> None:
        command = [sys.executable, str(Path(__file__).with_name("floor_proxy.py"))]
        command.append(self.mock.url + "/v1")
        log = self.tmp / "floor.log"
        self.add(
            "floor", partial(Server.start, "floor", command, cpu=self.args.gateway_cpu, log=log)
        )

    def litellm(self) -> None:
        venv, spec = Path(self.args.litellm_venv), self.args.litellm_spec
        start = partial(start_litellm, venv, spec, self.mock, self.tmp, self.args.gateway_cpu)
        self.add("LiteLLM", start, prefix="mock/")
        if (venv / "bin" / "python").exists():
            self.litellm_version = litellm_version(venv)

    async def openfusion(self, variant: str | None = None, baseline: str | None = None) -> None:
        workers, ledger = VARIANTS[variant] if variant else (1, "sqlite")
        name = f"openfusion {variant}" if variant else "openfusion"
        source = None
        if baseline:
            name, source = f"openfusion @{baseline}", self.checkout(baseline)
        database_url = None
        if ledger == "postgres":
            admin = self.args.postgres
            try:
                database = await create_database(admin)
            except (OSError, asyncpg.PostgresError) as exc:
                self.targets.append(Target(name, None, fusion=True, broken=f"PostgreSQL: {exc}"))
                return
            self.stack.push_async_callback(drop_database, admin, database)
            database_url = admin.replace("postgresql://", "postgresql+asyncpg://", 1)
            database_url = f"{database_url.rsplit('/', 1)[0]}/{database}"
        start = partial(start_openfusion, name, workers, database_url, self.mock, self.tmp)
        start = partial(start, self.args.gateway_cpu, ledger=ledger != "none", source=source)
        self.add(name, start, prefix="mock/", fusion=True)

    def checkout(self, revision: str) -> Path:
        """``revision``'s source tree in a temporary git worktree (removed on exit)."""
        where = self.tmp / f"at-{revision.replace('/', '_')}"
        git = ["git", "-C", str(ROOT)]
        add = [*git, "worktree", "add", "--detach", str(where), revision]
        done = subprocess.run(add, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"--baseline {revision}: {done.stderr.strip()}")
        remove = [*git, "worktree", "remove", "--force", str(where)]
        self.stack.callback(subprocess.run, remove, check=False)
        return where / "src"

    async def ready(self) -> Target:
        """Wait for every gateway (a real completion through it); the mock as a target."""
        direct = Target("direct", self.mock)
        async with session(4) as probe:
            await wait_ready(probe, direct, 20)
            for target in self.targets:
                if target.broken is None:
                    try:
                        await wait_ready(probe, target, 120)
                    except RuntimeError as exc:
                        log(f"{target.name} not run: {exc}")
                        target.broken = str(exc)[:200]
        return direct


async def compare(args: argparse.Namespace) -> None:
    start_load = loadavg()
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openfusion-bench-")))
        gateways = Gateways(args, stack, tmp)
        gateways.floor()
        if args.litellm:
            gateways.litellm()
        await gateways.openfusion()
        if args.baseline:
            await gateways.openfusion(baseline=args.baseline)
        for variant in args.variants:
            await gateways.openfusion(variant)
        direct = await gateways.ready()
        log(f"ready in {time.monotonic() - started:.0f} s; load average {loadavg()}")
        bench = Bench(args, direct, gateways.targets)
        await bench.run()
    print(*machine_facts(gateways.litellm_version), sep="\n")
    print(
        f"gateways on CPU {args.gateway_cpu}, mock and load on CPU {args.load_cpu}; "
        f"load average (1/5/15 min) {start_load} at the start, {loadavg()} at the end; "
        f"{args.rounds} round(s), {(time.monotonic() - started) / 60:.1f} min"
    )
    print()
    print(*table(bench), sep="\n")
    print()
    print(*goals(bench), sep="\n")
    print()
    print(*details(bench), sep="\n")


async def profile(args: argparse.Namespace, out: Path) -> None:
    """openfusion alone under the (c) load, sampled by py-spy: pass-through, streamed
    pass-through, fusion. Per-thread CPU from /proc: py-spy's other-thread samples are not CPU."""
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openfusion-bench-")))
        gateways = Gateways(args, stack, tmp)
        await gateways.openfusion(args.variants[0] if args.variants else None)
        direct = await gateways.ready()
        bench = Bench(args, direct, gateways.targets)
        passing, fusing = bench.rows
        for row, streamed, name in (
            (passing, False, "pass"),
            (passing, True, "stream"),
            (fusing, False, "fusion"),
        ):
            server = row.target.server
            if server is None:
                raise SystemExit(f"{row.target.name} did not start: {row.target.broken}")
            raw = out / f"{name}.txt"
            log(f"profiling {name} at c={args.concurrency} for {args.seconds:.0f} s -> {raw}")
            pid = server.proc.pid
            spy = record(pid, args.warmup + args.seconds, raw, cpu=args.load_cpu)
            sampling = asyncio.create_task(spy)
            before = thread_cpu_seconds(pid)
            await bench.throughput(row, args.concurrency, streamed=streamed)
            after = thread_cpu_seconds(pid)
            await sampling
            t = row.throughput[-1]
            per_request = 1000 / max(1, t.requests)
            main_thread = per_request * (after.get(pid, 0.0) - before.get(pid, 0.0))
            threads = per_request * (sum(after.values()) - sum(before.values())) - main_thread
            print(
                f"## {name}: {t.requests / t.seconds:.0f} req/s under py-spy, {t.errors} errors; "
                f"CPU ms per request: main thread {main_thread:.2f}, other threads {threads:.2f}"
            )
            print(*summarise(raw), sep="\n")
            print()


def main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.load_cpu})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets in (d)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        uvloop.run(profile(args, Path(args.profile)))
    else:
        uvloop.run(compare(args))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="repeat every measurement")
    parser.add_argument("--pairs", type=int, default=200, help="(a) calls per gateway and round")
    parser.add_argument("--fusion-pairs", type=int, default=50, help="(b) at c=1, per round")
    parser.add_argument("--stream-pairs", type=int, default=50, help="(e) per round")
    parser.add_argument("--warmup-pairs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="(c) seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per cell")
    parser.add_argument("--concurrency", type=int, default=64, help="(c)")
    parser.add_argument("--crowd", type=int, default=256, help="(b) high concurrency; 0: skip")
    parser.add_argument("--capacity", type=int, default=2000, help="(d) requests; 0: skip")
    parser.add_argument("--capacity-timeout", type=float, default=120.0)
    parser.add_argument("--slow", type=float, default=1.0, help="(d) seconds per upstream call")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        default=["workers2", "postgres"],
        help="(f) openfusion variants beside the default (none: just the default)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run openfusion as of this git revision (e.g. main, HEAD~3), same run",
    )
    parser.add_argument("--no-litellm", dest="litellm", action="store_false")
    parser.add_argument(
        "--litellm-venv",
        default=str(Path(platformdirs.user_cache_dir("openfusion-bench")) / "litellm-venv"),
    )
    parser.add_argument("--litellm-spec", default="litellm[proxy]", help="what pip installs")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN, help="(f) where to make a database")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--seed", type=int, default=12, help="the gateways' order per round")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round, short cells, 128 in (b), 500 in (d): < 4 minutes",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="instead: py-spy on openfusion (the first --variants entry, else the default) "
        "under the (c) load; raw stacks to DIR, a ranking printed",
    )
    parser.add_argument("--serve-mock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-without-ledger", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.pairs, args.fusion_pairs, args.stream_pairs = 1, 100, 30, 30
        args.seconds, args.crowd, args.capacity = 2.0, min(args.crowd, 128), min(args.capacity, 500)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve_mock:
        serve_mock(arguments.slow)
    elif arguments.serve_without_ledger:
        serve_without_ledger(arguments.serve_without_ledger)
    else:
        main(arguments)
