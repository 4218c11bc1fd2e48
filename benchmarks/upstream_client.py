"""Upstream HTTP client: aiohttp vs httpx vs openfusion's provider, against a loopback upstream.

Why openfusion calls upstreams with aiohttp: fires ``--requests`` non-streaming chat-completion
POSTs at each ``--concurrency`` with

- ``aiohttp``: one ``aiohttp.ClientSession``, connector ``limit`` = the concurrency;
- ``httpx``: one ``httpx.AsyncClient``, ``max_connections`` and keepalive = the concurrency;
- ``openfusion``: ``OpenAICompatProvider.complete`` as the gateway builds it (its session keeps
  aiohttp's default connector, so at most 100 connections).

The upstream is a minimal ``aiohttp.web`` server in a subprocess on 127.0.0.1 (its own process,
so on a 2-core machine client and server each get a core), answering every call with a small
chat-completion JSON. Clients run on uvloop, as in ``openfusion serve``. Each cell starts with
an untimed warm-up (opens the connections), then stops at ``--requests`` or ``--max-seconds``,
whichever comes first (the table shows how many requests were done).

    pip install -e '.[bench]'
    python benchmarks/upstream_client.py [--requests 2000] [--concurrency 1 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import uvloop
from aiohttp import web
from load import Call, Result, failures, percentile, run_load

from openfusion.providers.openai_compat import create
from openfusion.settings import ProviderConfig, Settings
from openfusion.types import CompletionRequest, Message

ANSWER = {
    "id": "gen-1",
    "object": "chat.completion",
    "created": 0,
    "model": "bench",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Jane Austen wrote it."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}
PAYLOAD = {"model": "bench", "messages": [{"role": "user", "content": "Who wrote Emma?"}]}
REQUEST = CompletionRequest("bench", (Message("user", "Who wrote Emma?"),))

WARMUP_SECONDS = 2.0
"""Each cell first sends 2 x concurrency untimed requests (opens the connections), for at most
this long."""


# -- the upstream (subprocess) ---------------------------------------------------------------


def serve_upstream() -> None:
    """Serve ``ANSWER`` on a free port of 127.0.0.1; print the port, run until terminated."""
    body = json.dumps(ANSWER).encode()

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(
        app, sock=sock, print=None, access_log=None, backlog=1024, loop=uvloop.new_event_loop()
    )


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 10
    while True:  # wait until it accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the upstream did not start") from None
            time.sleep(0.05)


# -- the load loop ----------------------------------------------------------------------------


async def bench(
    client: str, call: Call, requests: int, concurrency: int, max_seconds: float
) -> Result:
    await run_load(client, call, 2 * concurrency, concurrency, WARMUP_SECONDS)
    return await run_load(client, call, requests, concurrency, max_seconds)


async def bench_aiohttp(url: str, requests: int, c: int, max_seconds: float) -> Result:
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call() -> None:
            async with session.post(url + "/chat/completions", json=PAYLOAD) as resp:
                resp.raise_for_status()
                await resp.json()

        return await bench("aiohttp", call, requests, c, max_seconds)


async def bench_httpx(url: str, requests: int, c: int, max_seconds: float) -> Result:
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def call() -> None:
            resp = await client.post(url + "/chat/completions", json=PAYLOAD)
            resp.raise_for_status()
            resp.json()

        return await bench("httpx", call, requests, c, max_seconds)


async def bench_openfusion(url: str, requests: int, c: int, max_seconds: float) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(config_dir=Path(tmp), cache_dir=Path(tmp))
        config = ProviderConfig(type="openai_compat", base_url=url, api_key_env="")
        provider = create("bench", config, settings)
        try:

            async def call() -> None:
                await provider.complete(REQUEST)

            return await bench("openfusion", call, requests, c, max_seconds)
        finally:
            await provider.aclose()


async def main(args: argparse.Namespace) -> None:
    proc, url = start_upstream()
    results: list[Result] = []
    try:
        for c in args.concurrency:
            for runner in (bench_aiohttp, bench_httpx, bench_openfusion):
                results.append(await runner(url, args.requests, c, args.max_seconds))
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"{'client':<11} {'conc':>5} {'requests':>8} {'seconds':>8} {'req/s':>8} ", end="")
    print(f"{'p50 ms':>7} {'p99 ms':>7}")
    for r in results:
        p50, p99 = (1000 * percentile(r.latencies, q) for q in (0.5, 0.99))
        rate = r.requests / r.seconds
        print(f"{r.name:<11} {r.concurrency:>5} {r.requests:>8} {r.seconds:>8.2f} ", end="")
        print(f"{rate:>8.0f} {p50:>7.2f} {p99:>7.2f}")
    print(*failures(results), sep="\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--max-seconds", type=float, default=5.0, help="time limit per cell")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream()
    else:
        uvloop.run(main(args))
