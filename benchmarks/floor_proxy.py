"""The Python floor: a bare aiohttp pass-through proxy, what any Python gateway costs at least.

    python benchmarks/floor_proxy.py UPSTREAM_BASE_URL   # prints its port; serves until killed

``POST /v1/chat/completions`` goes to ``UPSTREAM_BASE_URL/chat/completions`` over one pooled
session; the answer (a stream too) is relayed as it arrives. Nothing is parsed or recorded.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].post(request.app[UPSTREAM], data=body, headers=headers) as up:
        if up.content_type != "text/event-stream":
            body = await up.read()
            return web.Response(status=up.status, body=body, content_type=up.content_type)
        response = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
        await response.prepare(request)
        async for block in up.content.iter_any():
            await response.write(block)
        await response.write_eof()
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def main(upstream: str) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/") + "/chat/completions"
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", proxy)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    loop = uvloop.new_event_loop()
    web.run_app(app, sock=sock, print=None, access_log=None, backlog=1024, loop=loop)


if __name__ == "__main__":
    main(sys.argv[1])
