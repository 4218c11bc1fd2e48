"""The gateway's own overhead: openfusion's server in front of a provider that answers instantly.

Serves ``create_app`` with a ``ScriptedProvider`` as provider ``demo`` (no delay, no network)
under uvicorn (uvloop, httptools) in a subprocess on 127.0.0.1, and drives it with aiohttp at
each ``--concurrency`` for three scenarios:

- ``pass``: ``model: "demo/a"``, one provider call, JSON answer;
- ``stream``: the same with ``stream: true``, timed until ``data: [DONE]``;
- ``fusion``: ``model: "openfusion/demo"``, a 3-member panel (``demo/a``, ``demo/b``,
  ``demo/c``) and a judge (``demo/judge``): five provider calls, analysis JSON validated.

So the numbers are what the server, the engine and the store (every run recorded, its spend
in the ledger) cost per request. The server gets temporary config and data dirs
(``OPENFUSION_CONFIG_DIR`` / ``OPENFUSION_DATA_DIR`` / ``OPENFUSION_CACHE_DIR``), so its store
is a throwaway SQLite file and no user config is read or written; ``--database-url`` points it
at another database (e.g. a PostgreSQL you can write to). Each cell starts with an untimed
warm-up, then stops at ``--requests`` or ``--max-seconds``, whichever comes first (the table
shows how many requests were done).

    pip install -e '.[bench]'
    python benchmarks/server_throughput.py [--requests 500] [--concurrency 1 16 64]
    python benchmarks/server_throughput.py --database-url postgresql+asyncpg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
import uvloop
from load import Call, Result, failures, percentile, run_load

from openfusion.engine.runlog import RunLog
from openfusion.engine.trace import RunEnd, RunStart
from openfusion.providers import ProviderRegistry
from openfusion.providers.scripted import ScriptedProvider, Step
from openfusion.server import create_app
from openfusion.settings import Settings

ANALYSIS_JSON = json.dumps(
    {
        "consensus": ["Jane Austen wrote it"],
        "contradictions": [],
        "partial_coverage": [],
        "unique_insights": [{"model": "Response A", "insight": "published 1815"}],
        "blind_spots": [],
    }
)
CONFIG = 'default_preset = "demo"\n'
PRESET = (
    'description = "benchmark panel"\njudge = "demo/judge"\n'
    'panel = [{ model = "demo/a" }, { model = "demo/b" }, { model = "demo/c" }]\n'
)
MESSAGES = [{"role": "user", "content": "Who wrote Emma?"}]
SCENARIOS: dict[str, dict[str, Any]] = {
    "pass": {"model": "demo/a", "messages": MESSAGES},
    "stream": {"model": "demo/a", "messages": MESSAGES, "stream": True},
    "fusion": {"model": "openfusion/demo", "messages": MESSAGES},
}
UNSAFE_ENV = (
    "OPENFUSION_DATABASE_URL",
    "OPENFUSION_PRESET",
    "OPENROUTER_API_KEY",
    "OPENAI_API_KEY",
)
"""Not passed to the server: it must not reach the user's store or anything with a key."""
WARMUP_SECONDS = 2.0


# -- the server (subprocess) ------------------------------------------------------------------


class NullStore:
    """Keeps nothing: no keys, no budgets, no spend, no runs (``gateways.py --variants
    no-ledger``: what the store costs the gateway)."""

    def __init__(self) -> None:
        self.ledger = self
        self.keys = self
        self.runs = self
        self.sessions = self

    async def init(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def has_active_keys(self) -> bool:
        return False

    async def reserve(self, *args: object, **kwargs: object) -> None:
        return None

    async def settle(self, *args: object, **kwargs: object) -> None:
        pass


class NullRecorder:
    """Records nothing: runs are traced in memory (the engine does that anyway) and dropped."""

    def start_run(self, start: RunStart) -> RunLog:
        return RunLog(start, source="server")

    def discard(self, run: RunLog) -> None:
        pass

    def settle(self, run: RunLog, end: RunEnd, *args: object) -> asyncio.Future[None]:
        run.finish(end)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def hurry(self) -> None:
        pass

    async def room(self) -> None:
        pass

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def serve() -> None:
    """Serve the app on a free port of 127.0.0.1; print the port, run until terminated."""
    settings = Settings.load()
    registry = ProviderRegistry(settings)
    answer = Step("Jane Austen wrote Emma.")
    analysis = Step(ANALYSIS_JSON)
    script = {
        "a": answer,
        "b": answer,
        "c": answer,
        "judge": lambda request: analysis if request.json_schema is not None else answer,
    }
    registry.register("demo", ScriptedProvider(script))
    config = uvicorn.Config(
        create_app(settings, registry=registry),
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        backlog=1024,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def start_server(config_dir: Path, database_url: str | None) -> tuple[subprocess.Popen[str], str]:
    (config_dir / "presets").mkdir(parents=True)
    (config_dir / "config.toml").write_text(CONFIG)
    (config_dir / "presets" / "demo.toml").write_text(PRESET)
    env = {k: v for k, v in os.environ.items() if k not in UNSAFE_ENV}
    env["OPENFUSION_CONFIG_DIR"] = str(config_dir)
    env["OPENFUSION_CACHE_DIR"] = str(config_dir / "cache")
    env["OPENFUSION_DATA_DIR"] = str(config_dir / "data")
    if database_url:
        env["OPENFUSION_DATABASE_URL"] = database_url
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
    return proc, url


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            async with session.get(url + "/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the openfusion server did not start")


# -- the load loop ----------------------------------------------------------------------------


def make_call(session: aiohttp.ClientSession, url: str, scenario: str) -> Call:
    body = SCENARIOS[scenario]

    async def call() -> None:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            if not body.get("stream"):
                answer = await resp.json()
                assert answer["choices"][0]["message"]["content"], answer
                return
            async for line in resp.content:
                if line.rstrip() == b"data: [DONE]":
                    return
            raise AssertionError("the stream ended without data: [DONE]")

    return call


async def main(args: argparse.Namespace) -> None:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), args.database_url)
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as probe:
                await wait_ready(probe, url, proc)
            for scenario in SCENARIOS:
                for c in args.concurrency:
                    connector = aiohttp.TCPConnector(limit=c)
                    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
                        call = make_call(s, url, scenario)
                        await run_load(scenario, call, 2 * c, c, WARMUP_SECONDS)
                        results.append(
                            await run_load(scenario, call, args.requests, c, args.max_seconds)
                        )
        finally:
            proc.terminate()
            proc.wait(15)
    print(f"store: {'sqlite (a temporary file)' if not args.database_url else 'database_url'}")
    print(f"{'scenario':<9} {'conc':>5} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    for r in results:
        p50, p99 = (1000 * percentile(r.latencies, q) for q in (0.5, 0.99))
        rate = r.requests / r.seconds
        print(f"{r.name:<9} {r.concurrency:>5} {r.requests:>8} {rate:>8.0f} ", end="")
        print(f"{p50:>7.2f} {p99:>7.2f}")
    print(*failures(results), sep="\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="timed requests per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-seconds", type=float, default=6.0, help="time limit per cell")
    parser.add_argument("--database-url", help="the store's database (default: a temp SQLite)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
    else:
        uvloop.run(main(args))
