"""No client input gives a 5xx. The published OpenAPI schema drives schemathesis against a live
server with scripted models (examples, boundary values, then random bodies per operation,
bounded so the run stays within a minute or so); then the inputs that once gave a 500, as
regressions."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from server_fixtures import RunningServer, setup_demo

from openfusion.server.app import MAX_JSON_DEPTH
from openfusion.server.openapi import openapi_document

MAX_EXAMPLES = 25
MODELS = ["openrouter/fusion", "demo/a", "openfusion/demo"]
USER = [{"role": "user", "content": "Who wrote Emma?"}]


@pytest.fixture
def fuzz_server(serve: Any) -> RunningServer:
    """Preset ``demo`` (scripted ``demo/a``, ``demo/b``, ``demo/c``, judge ``demo/judge``) is
    the default, so ``openrouter/fusion`` runs a whole fusion."""
    demo = setup_demo()
    return serve(demo.settings, demo.registry)  # type: ignore[no-any-return]


schema = schemathesis.openapi.from_dict(openapi_document())
"""The document the server publishes (the test below checks that it is), loaded at import:
schemathesis makes one test per operation from it."""


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=True,
)
def test_no_input_gives_a_server_error(fuzz_server: RunningServer, case: schemathesis.Case) -> None:
    body = case.body
    if isinstance(body, dict) and len(json.dumps(body, default=str)) % 4:
        # three in four bodies are nudged past the first checks into the engine — a model the
        # server has, a user question — while the rest of the body stays as generated
        if isinstance(body.get("model"), str):
            body["model"] = MODELS[len(body["model"]) % len(MODELS)]
        if isinstance(body.get("messages"), list):
            body["messages"].append({"role": "user", "content": "Who wrote Emma?"})
        if isinstance(body.get("input"), str):
            body["input"] += " Who wrote Emma?"
        elif isinstance(body.get("input"), list):
            body["input"].append({"role": "user", "content": "Who wrote Emma?"})
    response = case.call(base_url=fuzz_server.url)
    assert response.status_code < 500, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
        f"{case.as_curl_command()}"
    )


async def test_the_schema_is_built_from_the_request_models(fuzz_server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(fuzz_server.url + "/openapi.json") as resp,
    ):
        assert resp.status == 200
        document = await resp.json()
    assert document == openapi_document()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    model = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "messages", "plugins", "tool_choice", "max_cost"} <= set(model["properties"])
    assert model["required"] == ["model", "messages"]
    assert "/v1/responses" in document["paths"]


# -- the inputs that once gave a 500 ---------------------------------------------------------


async def post(
    server: RunningServer, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.base_url + "/chat/completions",
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize("value", ["²", "1²", "\u0661", "\uff19", "1" * 5000, "+1", "1.0"])
async def test_a_depth_header_that_is_not_ascii_digits_is_a_400(
    fuzz_server: RunningServer, value: str
) -> None:
    """``"²".isdigit()`` is true and ``int("²")`` raises; ``int("1" * 5000)`` raises too."""
    body = {"model": "openfusion/demo", "messages": USER}
    status, answer = await post(fuzz_server, body, {"x-openfusion-depth": value})
    assert status == 400, answer
    message = answer["error"]["message"]
    assert "x-openfusion-depth: must be a non-negative integer" in message


@pytest.mark.parametrize("depth", [100_000, 1_000, MAX_JSON_DEPTH + 1])
async def test_a_deeply_nested_body_is_a_400(fuzz_server: RunningServer, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = b'{"model": "openfusion/demo", "messages": %s}' % nested.encode()
    status, answer = await post(fuzz_server, body)
    assert status == 400, answer
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in answer["error"]["message"]


async def test_a_body_nested_to_the_limit_is_read(fuzz_server: RunningServer) -> None:
    """The limit leaves room for real requests: a body ``MAX_JSON_DEPTH - 1`` deep (body,
    tools, tool, function, parameters, then two levels a step)."""
    parameters: dict[str, Any] = {"type": "object"}
    for _ in range((MAX_JSON_DEPTH - 6) // 2):
        parameters = {"type": "object", "properties": {"x": parameters}}
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    status, answer = await post(fuzz_server, {"model": "demo/a", "messages": USER, "tools": [tool]})
    assert status == 200, answer


@pytest.mark.parametrize(
    "choice",
    [
        {"function": "x"},
        {"type": "function", "function": "x"},
        {"type": "function", "function": {"name": 7}},
        {"type": "function", "function": {}},
        {"function": {"name": "x"}, "type": "tool"},
        "fusion!",
        ["auto"],
    ],
)
@pytest.mark.parametrize(
    "tier",
    [
        {"tools": [{"type": "openrouter:fusion"}]},
        {"plugins": [{"id": "fusion"}]},
        {},
    ],
    ids=["fusion-tool", "fusion-plugin", "plain"],
)
async def test_a_misshapen_tool_choice_is_a_400(
    fuzz_server: RunningServer, choice: Any, tier: dict[str, Any]
) -> None:
    body = {"model": "demo/a", "messages": USER, "tool_choice": choice, **tier}
    status, answer = await post(fuzz_server, body)
    assert status == 400, answer
    assert "tool_choice" in answer["error"]["message"]
