"""A server whose panel is itself: the depth header bounds the recursion. And a client that
leaves: its run is cancelled, down to the upstream calls."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import aiohttp
import pytest
from helpers import eventually
from server_fixtures import (
    Demo,
    RunningServer,
    bound_socket,
    judge_script,
    setup_demo,
    sse_data,
    write_preset,
)
from upstream_mock import MockUpstream, Reply

from openfusion.engine import DEPTH_HEADER

Serve = Callable[..., RunningServer]
QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]
JUDGE_ANSWER = "The judge alone says: Jane Austen."


@pytest.mark.parametrize(
    ("max_depth", "depths", "judge_calls"),
    [
        # 1 outer + 2 inner answered by a plain judge call; the outer analyses and synthesises.
        (1, {None: 1, "1": 2}, 2 + 2),
        # 1 outer + 2 inner fusions + 4 plain judge calls at depth 2.
        (2, {None: 1, "1": 2, "2": 4}, 4 + 2 * 2 + 2),
    ],
)
async def test_a_panel_of_itself_is_bounded_by_the_depth(
    serve: Serve, max_depth: int, depths: dict[str | None, int], judge_calls: int
) -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    demo = setup_demo(
        f"[server]\nmax_depth = {max_depth}\n\n"
        f'[providers.self]\ntype = "openai_compat"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\napi_key_env = ""\n',
        judge=judge_script(JUDGE_ANSWER),
    )
    write_preset("loop", "demo/judge", ["self/openfusion/loop", "self/openfusion/loop"])
    server = serve(demo.settings, demo.registry, sock=sock)

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.base_url + "/chat/completions",
            json={"model": "openfusion/loop", "messages": QUESTION},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        outer = await resp.json()

    inbound = server.completions()
    assert Counter(r.headers.get(DEPTH_HEADER) for r in inbound) == depths
    assert all(r.status == 200 for r in inbound)
    assert demo.models_called() == ["judge"] * judge_calls

    # The deepest requests were each answered by one call to the judge, and say so.
    deepest = [r.json() for r in inbound if r.headers.get(DEPTH_HEADER) == str(max_depth)]
    for answer in deepest:
        assert answer["choices"][0]["message"]["content"] == JUDGE_ANSWER
        assert answer["fusion"]["note"] == "depth_limit"
        assert answer["fusion"]["depth"] == max_depth
        assert answer["fusion"]["responses"] == []

    fusion = outer["fusion"]
    assert fusion["status"] == "ok"
    assert [r["name"] for r in fusion["responses"]] == [
        "self/openfusion/loop#1",
        "self/openfusion/loop#2",
    ]
    assert [r["content"] for r in fusion["responses"]] == [JUDGE_ANSWER, JUDGE_ANSWER]
    assert outer["choices"][0]["message"]["content"] == JUDGE_ANSWER


async def test_depth_header_at_the_limit_gets_one_judge_call(serve: Serve) -> None:
    demo = setup_demo(judge=judge_script(JUDGE_ANSWER))
    server = serve(demo.settings, demo.registry)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.base_url + "/chat/completions",
            json={"model": "openfusion/demo", "messages": QUESTION, "stream": True},
            headers={"x-openfusion-depth": "1"},
        ) as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    data = sse_data(text)
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in data[:-1]) == (
        JUDGE_ANSWER
    )
    assert data[-2]["fusion"]["note"] == "depth_limit"
    assert demo.models_called() == ["judge"]
    assert demo.provider.calls[0].headers == {DEPTH_HEADER: "2"}


# --- a client that leaves -------------------------------------------------------------------


def _hanging_demo(up: MockUpstream) -> Demo:
    up.replies["slow"] = Reply(delay=30)
    demo = setup_demo(
        f'[providers.mock]\ntype = "openai_compat"\nbase_url = "{up.base_url}"\napi_key_env = ""\n'
    )
    write_preset("hang", "demo/judge", ["mock/slow", "demo/a"])
    return demo


async def test_closing_a_stream_cancels_the_run(serve: Serve) -> None:
    async with MockUpstream() as up:
        demo = _hanging_demo(up)
        server = serve(demo.settings, demo.registry)
        idle = server.request_tasks()
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                server.base_url + "/chat/completions",
                json={"model": "openfusion/hang", "messages": QUESTION, "stream": True},
            )
            assert resp.status == 200
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
            await eventually(lambda: len(up.requests) == 1, "the slow member was called")
            assert server.request_tasks() != idle  # the run is in flight
            resp.close()  # drops the connection
        await eventually(lambda: up.disconnects == 1, "the upstream call was cancelled")
        await eventually(
            lambda: set(server.request_tasks()) <= set(idle), "the server's tasks ended"
        )
    assert "judge" not in demo.models_called()


async def test_cancelling_a_request_cancels_the_run(serve: Serve) -> None:
    async with MockUpstream() as up:
        demo = _hanging_demo(up)
        server = serve(demo.settings, demo.registry)
        idle = server.request_tasks()
        async with aiohttp.ClientSession() as session:

            async def ask() -> None:
                async with session.post(
                    server.base_url + "/chat/completions",
                    json={"model": "openfusion/hang", "messages": QUESTION},
                ) as resp:
                    await resp.read()

            request = asyncio.create_task(ask())
            await eventually(lambda: len(up.requests) == 1, "the slow member was called")
            assert not request.done()
            request.cancel()  # the client gives up: aiohttp closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request
        await eventually(lambda: up.disconnects == 1, "the upstream call was cancelled")
        await eventually(
            lambda: set(server.request_tasks()) <= set(idle), "the server's tasks ended"
        )
        # The server noticed the disconnect (499: client closed request), not a timeout.
        assert [r.status for r in server.completions()] == [499]
    assert "judge" not in demo.models_called()


async def test_client_timeout_cancels_the_run(serve: Serve) -> None:
    async with MockUpstream() as up:
        demo = _hanging_demo(up)
        server = serve(demo.settings, demo.registry)
        idle = server.request_tasks()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            with pytest.raises(TimeoutError):
                async with session.post(
                    server.base_url + "/chat/completions",
                    json={"model": "openfusion/hang", "messages": QUESTION},
                ) as resp:
                    await resp.read()
        assert len(up.requests) == 1
        await eventually(lambda: up.disconnects == 1, "the upstream call was cancelled")
        await eventually(
            lambda: set(server.request_tasks()) <= set(idle), "the server's tasks ended"
        )
