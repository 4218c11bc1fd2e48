"""The server's side of issue 13: only configured models are served (item 5), ``max_cost``
must be an amount (item 6), a judge pointing back at the gateway ends (item 7), a synthesis
cut mid-stream ends in ``finish_reason: "error"`` and the gateway's 429 says when to retry
(item 8)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from helpers import ANALYSIS, create_key
from server_fixtures import (
    RunningServer,
    bound_socket,
    setup_demo,
    sse_data,
    write_preset,
)
from upstream_mock import MockUpstream, Reply

from openfusion.engine import DEPTH_HEADER
from openfusion.providers import Provider, ProviderRegistry
from openfusion.providers.scripted import Step
from openfusion.store import SpendLedger

Serve = Callable[..., RunningServer]
QUESTION = [{"role": "user", "content": "Who wrote Pride and Prejudice?"}]


async def post_raw(
    server: RunningServer, body: bytes | dict[str, Any], key: str | None = None
) -> tuple[int, str, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + "/chat/completions", data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.text(), {k.lower(): v for k, v in resp.headers.items()}


# -- item 5: the models a deployment configures ----------------------------------------------


class WatchedRegistry(ProviderRegistry):
    """Records every provider the server builds or looks up."""

    asked: list[str]

    def provider(self, name: str) -> Provider:
        self.asked.append(name)
        return super().provider(name)


def watched(demo_registry: ProviderRegistry, settings: Any) -> WatchedRegistry:
    registry = WatchedRegistry(settings)
    registry.asked = []
    registry.register("demo", demo_registry.provider("demo"))
    return registry


@pytest.mark.parametrize(
    ("body", "field", "model"),
    [
        ({"model": "local/gemma-3-270m"}, "model", "local/gemma-3-270m"),
        ({"model": "demo/a", "models": ["demo/other"]}, "models", "demo/other"),
        (
            {"model": "demo/a", "plugins": [{"id": "fusion", "analysis_models": ["demo/x"]}]},
            "plugins",
            "demo/x",
        ),
        ({"model": "openfusion/quality"}, "model", None),  # a shipped preset not configured
    ],
)
async def test_a_model_the_deployment_does_not_configure_is_refused(
    serve: Serve, body: dict[str, Any], field: str, model: str | None
) -> None:
    demo = setup_demo(served=None)
    registry = watched(demo.registry, demo.settings)
    server = serve(demo.settings, registry)
    status, text, _ = await post_raw(server, {"messages": QUESTION, **body})
    assert status == 400, text
    message = json.loads(text)["error"]["message"]
    assert message.startswith(f"{field}: ")
    assert "is not served by this server" in message
    if model is not None:
        assert model in message
    assert "local" not in registry.asked  # the embedded model was never even looked up
    assert demo.provider.calls == []


async def test_the_preset_models_and_the_allow_list_are_served(serve: Serve) -> None:
    demo = setup_demo(served="demo/ex*", extra=Step("x"))
    server = serve(demo.settings, demo.registry)
    for model in ("demo/extra", "demo/a", "demo/judge", "openfusion/demo"):  # listed, or presets'
        status, text, _ = await post_raw(server, {"model": model, "messages": QUESTION})
        assert status == 200, (model, text)
    status, text, _ = await post_raw(server, {"model": "demo/other", "messages": QUESTION})
    assert status == 400 and "demo/other is not served" in text


# -- item 6: max_cost is an amount -------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1e400", "-1e400", "NaN", "Infinity", "-0.5", "0", "1e7"])
async def test_a_max_cost_that_is_not_an_amount_is_a_400_naming_it(serve: Serve, raw: str) -> None:
    demo = setup_demo()
    key_id, key = create_key(demo.settings, "budgeted")
    async with SpendLedger(demo.settings.database) as ledger:
        await ledger.set_budget(key_id, 1.0)
    server = serve(demo.settings, demo.registry)
    body = f'{{"model": "demo/a", "messages": {json.dumps(QUESTION)}, "max_cost": {raw}}}'
    status, text, _ = await post_raw(server, body.encode(), key)
    assert status == 400, text
    assert "max_cost" in json.loads(text)["error"]["message"]
    assert demo.provider.calls == []


# -- item 7: a judge that is the gateway itself --------------------------------------------------


async def test_a_judge_pointing_back_at_the_gateway_ends_with_a_clear_error(
    serve: Serve,
) -> None:
    sock = bound_socket()
    port = sock.getsockname()[1]
    demo = setup_demo(
        f'[providers.self]\ntype = "openai_compat"\n'
        f'base_url = "http://127.0.0.1:{port}/v1"\napi_key_env = ""\n'
    )
    write_preset("jloop", "self/openfusion/jloop", ["demo/a", "demo/b"])
    server = serve(demo.settings, demo.registry, sock=sock)
    fds = len(os.listdir("/proc/self/fd"))

    status, text, _ = await post_raw(server, {"model": "openfusion/jloop", "messages": QUESTION})

    assert status == 200, text
    fusion = json.loads(text)["fusion"]
    assert fusion["failure_reason"] == "judge_upstream_error"
    assert "past the maximum" in fusion["failure_message"]
    inbound = server.completions()
    # The outer request; its analysis and synthesis calls reach the gateway at depth 1 (one
    # plain call each to the judge: the gateway again, at depth 2, refused there).
    assert Counter(r.headers.get(DEPTH_HEADER) for r in inbound) == {None: 1, "1": 2, "2": 2}
    refused = [r for r in inbound if r.headers.get(DEPTH_HEADER) == "2"]
    assert all(r.status == 400 for r in refused)
    assert "past the maximum" in refused[0].json()["error"]["message"]
    assert len(os.listdir("/proc/self/fd")) < fds + 50
    assert demo.models_called().count("a") == 1  # the panel ran once, not in a loop


# -- item 8: a cut synthesis; the gateway's 429 ------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_a_synthesis_cut_mid_stream_finishes_with_error(serve: Serve, stream: bool) -> None:
    async with MockUpstream() as upstream:

        def judge(body: Any) -> Reply:
            if body.get("stream"):  # the synthesis: some text, then the connection drops
                return Reply(
                    "Jane Austen wrote Pride and Prejudice in 1813.", cut_after=3, reset=True
                )
            return Reply(json.dumps(ANALYSIS))

        upstream.replies["judge"] = judge
        demo = setup_demo(
            f'[providers.up]\ntype = "openai_compat"\nbase_url = "{upstream.base_url}"\n'
            'api_key_env = ""\n'
        )
        write_preset("cut", "up/judge", ["demo/a", "demo/b"])
        server = serve(demo.settings, demo.registry)
        body = {"model": "openfusion/cut", "messages": QUESTION, "stream": stream}
        status, text, _ = await post_raw(server, body)

    assert status == 200, text
    if stream:
        data = [d for d in sse_data(text) if d != "[DONE]"]
        content = "".join(
            d["choices"][0]["delta"].get("content") or "" for d in data if d["choices"]
        )
        final = data[-1]
        finish = final["choices"][0]["finish_reason"]
        fusion = final["fusion"]
    else:
        answer = json.loads(text)
        content = answer["choices"][0]["message"]["content"]
        finish = answer["choices"][0]["finish_reason"]
        fusion = answer["fusion"]
    assert content.strip() == "Jane Austen"  # the three chunks of four characters sent
    assert finish == "error"
    assert fusion["failure_reason"] == "judge_upstream_error"
    assert "cut off mid-stream" in fusion["failure_message"]


@pytest.mark.parametrize(("upstream_says", "we_say"), [({"Retry-After": "7"}, "7"), ({}, "5")])
async def test_the_gateways_429_carries_retry_after(
    serve: Serve, upstream_says: dict[str, str], we_say: str
) -> None:
    async with MockUpstream() as upstream:
        upstream.replies["busy"] = Reply(
            status=429, error={"message": "slow down"}, headers=upstream_says
        )
        demo = setup_demo(
            f'[providers.up]\ntype = "openai_compat"\nbase_url = "{upstream.base_url}"\n'
            'api_key_env = ""\n',
            served="up/busy",
        )
        server = serve(demo.settings, demo.registry)
        status, text, headers = await post_raw(server, {"model": "up/busy", "messages": QUESTION})
    assert status == 429, text
    assert headers["retry-after"] == we_say


async def test_models_lists_only_what_the_server_serves(serve: Serve) -> None:
    demo = setup_demo(served=None)
    server = serve(demo.settings, demo.registry)
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.base_url + "/models") as resp,
    ):
        ids = {e["id"] for e in (await resp.json())["data"]}
    assert {"openrouter/fusion", "openfusion/demo", "demo/a", "demo/judge"} <= ids
    assert "openfusion/quality" not in ids and "openrouter/fusion-flash" not in ids
    assert not any(i.startswith("local/") for i in ids)
