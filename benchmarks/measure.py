"""What benchmarks/gateways.py measures, and how: the calls, paired with direct ones at
concurrency 1, load cells at higher concurrency, and the capacity run. Results stay per round
in ``Row``s; ``report.py`` turns them into the table."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from load import Result, percentile, run_load
from processes import Server

MESSAGES = [{"role": "user", "content": "Who wrote Emma?"}]
JSON_HEADERS = {"Content-Type": "application/json"}
T = TypeVar("T")


@dataclass
class Target:
    """Something to send chat completions to: the mock itself (``direct``) or a gateway."""

    name: str
    server: Server | None
    prefix: str = ""
    """Before the mock's model name in a request: ``mock/`` for ``mock/a``."""
    fusion: bool = False
    """openfusion: serves ``openfusion/bench`` and ``openfusion/slow``."""
    broken: str | None = None
    """Why it is not measured (not installed, did not start)."""

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return self.server.url + "/v1/chat/completions"

    def body(self, model: str, *, stream: bool = False) -> bytes:
        data: dict[str, Any] = {"model": self.prefix + model, "messages": MESSAGES}
        if stream:
            data["stream"] = True
        return json.dumps(data).encode()


# -- calls ------------------------------------------------------------------------------------


async def complete(session: aiohttp.ClientSession, endpoint: str, body: bytes) -> None:
    async with session.post(endpoint, data=body, headers=JSON_HEADERS) as resp:
        data = await resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:300].decode(errors='replace')}")
    if not json.loads(data)["choices"][0]["message"]["content"]:
        raise RuntimeError("an empty answer")


@dataclass(frozen=True)
class StreamTimes:
    first: float
    """Seconds to the first chunk with content."""
    total: float
    """Seconds to the end of the stream."""
    gap: float
    """Mean seconds between content chunks."""


async def stream(session: aiohttp.ClientSession, endpoint: str, body: bytes) -> StreamTimes:
    start = time.perf_counter()
    first = last = 0.0
    chunks = 0
    async with session.post(endpoint, data=body, headers=JSON_HEADERS) as resp:
        if resp.status != 200:
            text = (await resp.read())[:300].decode(errors="replace")
            raise RuntimeError(f"HTTP {resp.status}: {text}")
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            choices = json.loads(data).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
    end = time.perf_counter()
    if chunks < 2:
        raise RuntimeError(f"a stream with {chunks} content chunks")
    return StreamTimes(first - start, end - start, (last - first) / (chunks - 1))


def session(limit: int, timeout: float = 60.0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))


async def timed(call: Awaitable[None]) -> float:
    start = time.perf_counter()
    await call
    return time.perf_counter() - start


async def paired(
    first: Callable[[], Awaitable[T]], second: Callable[[], Awaitable[T]], pairs: int
) -> tuple[list[T], list[T]]:
    """``pairs`` calls of each, alternating, and which goes first alternating too."""
    ones: list[T] = []
    twos: list[T] = []
    for i in range(pairs):
        if i % 2:
            twos.append(await second())
            ones.append(await first())
        else:
            ones.append(await first())
            twos.append(await second())
    return ones, twos


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Throughput:
    requests: int
    errors: int
    seconds: float
    cpu: float
    """Gateway CPU seconds (its process tree)."""
    client_cpu: float
    """This process's CPU seconds: near ``seconds``, the load itself was the limit."""
    mock_cpu: float
    others_cpu: float
    """The other gateways' CPU seconds meanwhile (they should be idle)."""


@dataclass
class Capacity:
    requests: int
    errors: int
    last_answer: float
    """Seconds from the first request sent to the last answer received."""
    p50: float
    peak_rss: int
    idle_rss: int
    failures: list[tuple[str, int]]
    """The commonest failures (digits replaced by ``#``) and how many."""


@dataclass
class Row:
    """One line of the table: a gateway on one path (``pass`` or ``fusion``)."""

    target: Target
    path: str
    added: list[tuple[list[float], list[float]]] = field(default_factory=list)
    """(a) or (b) at concurrency 1, per round: (direct latencies, gateway latencies)."""
    crowded: list[tuple[list[float], list[float]]] = field(default_factory=list)
    """(b) at concurrency 256, per round: (direct latencies, fusion latencies)."""
    throughput: list[Throughput] = field(default_factory=list)
    streams: list[tuple[list[StreamTimes], list[StreamTimes]]] = field(default_factory=list)
    capacity: Capacity | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.target.name} · {self.path}"


class Bench:
    def __init__(self, args: argparse.Namespace, direct: Target, targets: list[Target]) -> None:
        self.args = args
        self.direct = direct
        self.targets = targets
        self.rows: list[Row] = []
        for target in targets:
            self.rows.append(Row(target, "pass"))
            if target.fusion:
                self.rows.append(Row(target, "fusion"))
        self.random = random.Random(args.seed)

    def shuffled(self, path: str) -> list[Row]:
        rows = [r for r in self.rows if r.path == path and r.target.broken is None]
        self.random.shuffle(rows)
        return rows

    @contextmanager
    def cell(self, row: Row, what: str) -> Iterator[None]:
        """A measurement that fails is noted in its row; the others go on."""
        try:
            yield
        except Exception as exc:
            row.errors.append(f"{what}: {type(exc).__name__}: {exc}"[:400])
            log(f"  {row.label} {what} failed: {row.errors[-1]}")

    async def latency(self, row: Row) -> None:
        """(a) for a pass row, (b) at concurrency 1 for a fusion row."""
        body = row.target.body("a") if row.path == "pass" else fusion_body()
        direct_body = self.direct.body("a")
        async with session(4) as mine, session(4) as theirs:

            def direct() -> Awaitable[float]:
                return timed(complete(mine, self.direct.endpoint, direct_body))

            def gateway() -> Awaitable[float]:
                return timed(complete(theirs, row.target.endpoint, body))

            await paired(direct, gateway, self.args.warmup_pairs)
            pairs = self.args.pairs if row.path == "pass" else self.args.fusion_pairs
            row.added.append(await paired(direct, gateway, pairs))

    async def streams(self, row: Row) -> None:
        """(e): streamed pass-through, paired with direct streams."""
        direct_body = self.direct.body("s", stream=True)
        body = row.target.body("s", stream=True)
        async with session(4) as mine, session(4) as theirs:

            def direct() -> Awaitable[StreamTimes]:
                return stream(mine, self.direct.endpoint, direct_body)

            def gateway() -> Awaitable[StreamTimes]:
                return stream(theirs, row.target.endpoint, body)

            await paired(direct, gateway, self.args.warmup_pairs)
            row.streams.append(await paired(direct, gateway, self.args.stream_pairs))

    async def throughput(self, row: Row, concurrency: int, *, streamed: bool = False) -> None:
        """(c): as many requests as ``--seconds`` allow, ``concurrency`` at a time;
        ``streamed``: pass-through streams of ``s`` instead (for profiles)."""
        server = row.target.server
        mock = self.direct.server
        assert server is not None and mock is not None
        if streamed:
            body = row.target.body("s", stream=True)
        else:
            body = row.target.body("a") if row.path == "pass" else fusion_body()
        others = [t.server for t in self.targets if t.server not in (None, server)]
        async with session(concurrency) as s:

            async def call() -> None:
                if streamed:
                    await stream(s, row.target.endpoint, body)
                else:
                    await complete(s, row.target.endpoint, body)

            await run_load(row.label, call, 10 * concurrency, concurrency, self.args.warmup)

            def cpu() -> tuple[float, float, float, float]:
                other = sum(o.cpu_seconds() for o in others if o is not None)
                return server.cpu_seconds(), time.process_time(), mock.cpu_seconds(), other

            await quiet(server)  # the warm-up's deferred work is not this cell's
            before = cpu()
            result = await run_load(row.label, call, 10**9, concurrency, self.args.seconds)
            await quiet(server)  # this cell's is: runs written after their answers
            after = cpu()
        gateway, client, upstream, other = (b - a for a, b in zip(before, after, strict=True))
        row.throughput.append(
            Throughput(
                result.requests, result.errors, result.seconds, gateway, client, upstream, other
            )
        )
        note_errors(row, result)

    async def crowded(self, row: Row, direct: list[float]) -> None:
        """(b) at concurrency 256: fusion latencies, against ``direct`` ones at 256."""
        c = self.args.crowd
        async with session(c) as s:

            async def call() -> None:
                await complete(s, row.target.endpoint, fusion_body())

            # No warm-up: the wave itself opens the connections, a small cost beside fusions'.
            result = await run_load(row.label, call, 2 * c, c, 4 * self.args.seconds)
        row.crowded.append((direct, result.latencies))
        note_errors(row, result)

    async def direct_crowd(self) -> list[float]:
        c = self.args.crowd
        body = self.direct.body("a")
        async with session(c) as s:

            async def call() -> None:
                await complete(s, self.direct.endpoint, body)

            await run_load("direct", call, c, c, self.args.warmup)
            return (await run_load("direct", call, 4 * c, c, self.args.seconds)).latencies

    async def capacity(self, row: Row) -> None:
        """(d): ``--capacity`` slow fusion requests at once."""
        server = row.target.server
        assert server is not None
        n = self.args.capacity
        body = fusion_body("slow")
        idle = peak = server.rss_bytes()
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.rss_bytes())
                await asyncio.sleep(0.1)

        failures: Counter[str] = Counter()
        sampler = asyncio.create_task(sample())
        try:
            async with session(0, timeout=self.args.capacity_timeout) as s:

                async def call() -> None:
                    try:
                        await complete(s, row.target.endpoint, body)
                    except Exception as exc:
                        failures[re.sub(r"\d+", "#", f"{type(exc).__name__}: {exc}")[:300]] += 1
                        raise

                result = await run_load(row.label, call, n, n, self.args.capacity_timeout)
        finally:
            done.set()
            await sampler
        p50 = percentile(result.latencies, 0.5)
        common = failures.most_common(3)
        row.capacity = Capacity(n, result.errors, result.seconds, p50, peak, idle, common)

    async def run(self) -> None:
        for number in range(1, self.args.rounds + 1):
            started = time.monotonic()
            for row in self.shuffled("pass"):
                with self.cell(row, "(a) latency"):
                    await self.latency(row)
            for row in self.shuffled("fusion"):
                with self.cell(row, "(b) latency"):
                    await self.latency(row)
            for row in self.shuffled("pass"):
                with self.cell(row, "(e) streams"):
                    await self.streams(row)
            for row in [*self.shuffled("pass"), *self.shuffled("fusion")]:
                with self.cell(row, "(c) throughput"):
                    await self.throughput(row, self.args.concurrency)
            if self.args.crowd:
                direct = await self.direct_crowd()
                for row in self.shuffled("fusion"):
                    with self.cell(row, f"(b) at {self.args.crowd}"):
                        await self.crowded(row, direct)
            log(f"round {number}/{self.args.rounds}: {time.monotonic() - started:.0f} s")
        for fusing in self.rows if self.args.capacity else ():
            if fusing.path == "fusion" and fusing.target.broken is None:
                log(f"(d) capacity: {self.args.capacity} fusion requests at once, {fusing.label}")
                with self.cell(fusing, "(d) capacity"):
                    await self.capacity(fusing)


async def quiet(server: Server, most: float = 10.0) -> None:
    """Until ``server`` idles (under a tenth of a core for 0.1 s): what it does after its
    answers (a gateway's store writes) counts in the CPU of the requests that caused it."""
    deadline = time.monotonic() + most
    last = server.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = server.cpu_seconds()
        if now - last < 0.01:
            return
        last = now


def fusion_body(preset: str = "bench") -> bytes:
    return json.dumps({"model": f"openfusion/{preset}", "messages": MESSAGES}).encode()


def note_errors(row: Row, result: Result) -> None:
    if result.errors:
        row.errors.append(f"{result.errors} failed requests, e.g. {result.first_error}"[:400])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
