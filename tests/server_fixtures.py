"""A real ``openfusion`` server for tests: uvicorn on 127.0.0.1, in a thread with its own loop.

    with run_server(settings, registry) as server:
        ... POST to server.url + "/v1/chat/completions" ...
        server.inbound          # every request the server received, with its response
        server.request_tasks()  # tasks still running in the server's loop, besides serving

The server runs in its own thread and event loop, so the test's loop stays free for clients
and for ``MockUpstream`` (which a server's provider may call), and a sync client works too.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from helpers import ANALYSIS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openfusion.providers import ProviderRegistry
from openfusion.providers.scripted import ScriptedProvider, Step, StepSource
from openfusion.server.app import create_app
from openfusion.server.protocol import uvicorn_options
from openfusion.settings import Settings
from openfusion.tools import ToolRegistry
from openfusion.types import CompletionRequest

ANSWER = "Jane Austen wrote it, in 1813."
PANEL_COSTS = {"a": 0.001, "b": 0.002, "c": 0.003}
ANALYSIS_COST = 0.0004
SYNTHESIS_COST = 0.0005
TOTAL_COST = sum(PANEL_COSTS.values()) + ANALYSIS_COST + SYNTHESIS_COST


def judge_script(
    answer: str = ANSWER,
    *,
    analysis_cost: float = ANALYSIS_COST,
    answer_cost: float = SYNTHESIS_COST,
) -> Callable[[CompletionRequest], Step]:
    """A judge for any number of fusions: JSON requests get the analysis, others the answer."""
    analysis = Step(json.dumps(ANALYSIS), cost=analysis_cost)
    text = Step(answer, cost=answer_cost)
    return lambda request: analysis if request.json_schema is not None else text


def demo_provider(**extra: StepSource) -> ScriptedProvider:
    """Scripted models ``a``, ``b``, ``c`` (costs ``PANEL_COSTS``), ``judge``, plus ``extra``."""
    script: dict[str, StepSource] = {
        "a": Step("Jane Austen.", cost=PANEL_COSTS["a"]),
        "b": Step("Austen, in 1813.", cost=PANEL_COSTS["b"]),
        "c": Step("It was Jane Austen.", cost=PANEL_COSTS["c"]),
        "judge": judge_script(),
    }
    script.update(extra)
    return ScriptedProvider(script)


def config_dir() -> Path:
    """The config dir conftest's ``isolated_env`` points ``OPENFUSION_CONFIG_DIR`` at."""
    path = Path(os.environ["OPENFUSION_CONFIG_DIR"])
    (path / "presets").mkdir(parents=True, exist_ok=True)
    return path


def write_config(text: str) -> None:
    """Write config.toml: ``text``, then one try per model unless ``text`` sets ``[retries]``
    (the tests count upstream calls and fail fast; retries have tests of their own)."""
    if "[retries]" not in text:
        text += "\n[retries]\nattempts = 1\n"
    (config_dir() / "config.toml").write_text(text)


def write_preset(name: str, judge: str, panel: list[str]) -> None:
    members = ", ".join(f'{{ model = "{model}" }}' for model in panel)
    (config_dir() / "presets" / f"{name}.toml").write_text(
        f'description = "test preset {name}"\njudge = "{judge}"\npanel = [{members}]\n'
    )


@dataclass
class Demo:
    settings: Settings
    registry: ProviderRegistry
    provider: ScriptedProvider
    """Registered as provider ``demo``; ``provider.calls`` has every request it got."""

    def models_called(self) -> list[str]:
        return [call.model for call in self.provider.calls]


def setup_demo(config: str = "", *, served: str | None = "*", **extra: StepSource) -> Demo:
    """Preset ``demo`` (panel ``demo/a``, ``demo/b``, ``demo/c``, judge ``demo/judge``), also
    the default preset; ``config`` is appended to config.toml, ``extra`` to the script.
    ``served`` goes to ``[server] models``: by default every model (the allow-list has tests of
    its own); ``None``: only the presets' models."""
    if served is not None:
        line = f'models = ["{served}"]\n'
        config = (
            config.replace("[server]\n", "[server]\n" + line, 1)
            if "[server]\n" in config
            else f"{config}\n[server]\n{line}"
        )
    write_config(f'default_preset = "demo"\n{config}')
    write_preset("demo", "demo/judge", ["demo/a", "demo/b", "demo/c"])
    settings = Settings.load()
    provider = demo_provider(**extra)
    registry = ProviderRegistry(settings)
    registry.register("demo", provider)
    return Demo(settings, registry, provider)


@dataclass
class Inbound:
    """One request the server received, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)

    def json(self) -> Any:
        return json.loads(self.body)


class Recorder:
    """ASGI middleware: records every HTTP request and its response (status and body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inbound: list[Inbound] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        record = Inbound(scope["method"], scope["path"], headers)
        self.inbound.append(record)

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body":
                record.body += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class RunningServer:
    url: str
    """``http://127.0.0.1:PORT`` (the API is under ``/v1``)."""
    recorder: Recorder
    loop: asyncio.AbstractEventLoop | None = None
    serve_task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def inbound(self) -> list[Inbound]:
        return self.recorder.inbound

    async def written(self, key: str | None = None) -> None:
        """Wait until the server has written the runs it answered (a run's end and spend are
        written just after its answer): ``GET /v1/fusion/runs`` waits for them. ``key``: the
        API key to ask with, on a server that has keys."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.base_url + "/fusion/runs?limit=1", headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()

    def completions(self) -> list[Inbound]:
        return [r for r in self.inbound if r.path == "/v1/chat/completions"]

    def request_tasks(self) -> list[str]:
        """The tasks running in the server's loop other than uvicorn's own serving task. Compare
        as sets (``<=`` a snapshot taken idle): a connection the store closes after startup
        can be among the snapshot's tasks and gone later."""
        assert self.loop is not None

        async def snapshot() -> list[str]:
            current = asyncio.current_task()
            return sorted(
                repr(t.get_coro())
                for t in asyncio.all_tasks()
                if t is not current and t is not self.serve_task
            )

        return asyncio.run_coroutine_threadsafe(snapshot(), self.loop).result(timeout=5)


def bound_socket() -> socket.socket:
    """A socket bound to a free port on 127.0.0.1 (to know the port before the server starts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def run_server(
    settings: Settings | None = None,
    registry: ProviderRegistry | None = None,
    *,
    sock: socket.socket | None = None,
    tools: ToolRegistry | None = None,
    **options: Any,
) -> Iterator[RunningServer]:
    """Serve ``create_app(settings, registry=registry, **options)`` until the block ends.

    ``settings`` defaults to ``Settings.load()`` (the test's config dir), ``registry`` to one
    with ``demo_provider()`` as provider ``demo``.
    """
    settings = settings or Settings.load()
    if registry is None:
        registry = ProviderRegistry(settings)
        registry.register("demo", demo_provider())
    recorder = Recorder(create_app(settings, registry=registry, tools=tools, **options))
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        recorder,
        loop="asyncio",
        ws="none",
        lifespan="on",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        # the protocol and head limits `openfusion serve` runs with
        **uvicorn_options(settings.server.max_header_bytes, settings.server.header_timeout_seconds),
    )
    server = uvicorn.Server(config)
    running = RunningServer(f"http://127.0.0.1:{port}", recorder)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            with asyncio.Runner() as runner:
                runner.run(_serve(server, sock, running))
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=serve, name=f"openfusion-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        thread.join(5)
        raise RuntimeError(f"the test server did not start: {failure or 'timeout'}")
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the test server did not shut down"
        if failure:
            raise failure[0]


async def _serve(server: uvicorn.Server, sock: socket.socket, running: RunningServer) -> None:
    running.loop = asyncio.get_running_loop()
    running.serve_task = asyncio.current_task()
    await server.serve(sockets=[sock])


async def post(
    server: RunningServer, path: str, body: dict[str, Any]
) -> tuple[int, str, dict[str, str]]:
    """POST ``body`` as JSON to ``server.base_url + path``: the status, the body's text and the
    headers (names lower-cased)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + path, json=body) as resp,
    ):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status, await resp.text(), headers


def sse_events(text: str) -> list[str]:
    """The blocks of a raw SSE body (each event or comment, without its blank line)."""
    assert text.endswith("\n\n"), f"SSE body does not end with a blank line: {text[-80:]!r}"
    return text[:-2].split("\n\n")


def sse_data(text: str) -> list[Any]:
    """The ``data:`` payloads of a raw SSE body, JSON-decoded (``[DONE]`` stays a string)."""
    payloads: list[Any] = []
    for event in sse_events(text):
        if event.startswith("data: "):
            data = event.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
