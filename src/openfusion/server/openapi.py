"""The API's OpenAPI 3.1 document (``GET /openapi.json``), built from the pydantic request models.

The request bodies are the very models the server validates with (``server/schema.py``,
``server/responses.py``), so the document cannot drift from what is accepted; responses are
described by status only. Clients may generate code from it, and the schema fuzzer
(``tests/test_fuzz.py``, schemathesis) drives every operation with inputs made from it.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from openfusion import __version__
from openfusion.server.responses import ResponsesRequest
from openfusion.server.schema import ChatCompletionRequest

__all__ = ["openapi_document"]

REF = "#/components/schemas/{model}"
STRING = {"schema": {"type": "string"}}
DEPTH_PARAMETERS = [
    {
        "name": header,
        "in": "header",
        "required": False,
        "description": "Fusion depth of the caller (a gateway calling itself); default 0.",
        "schema": {"type": "string", "pattern": "^[0-9]{1,4}$"},
    }
    for header in ("x-openrouter-fusion-depth", "x-openfusion-depth")
]
ERRORS = {
    str(status): {"description": text}
    for status, text in [
        (400, "invalid request: the message names the field"),
        (401, "missing or invalid API key"),
        (402, "budget or credits exhausted"),
        (403, "cross-origin request to a server without keys"),
        (404, "not found"),
        (408, "an upstream timed out"),
        (415, "body not sent as application/json (server without keys)"),
        (421, "Host not allowed (server without keys)"),
        (429, "rate limited"),
        (502, "an upstream failed"),
        (503, "the server cannot read its keys or store"),
    ]
}


def openapi_document() -> dict[str, Any]:
    """The document; built once per app (pydantic's schema generation is not free)."""
    refs, schemas = models_json_schema(
        [(ChatCompletionRequest, "validation"), (ResponsesRequest, "validation")],
        ref_template=REF,
    )
    chat = refs[(ChatCompletionRequest, "validation")]
    responses = refs[(ResponsesRequest, "validation")]
    return {
        "openapi": "3.1.0",
        "info": {"title": "openfusion", "version": __version__},
        "paths": {
            "/v1/chat/completions": {"post": _post("chatCompletion", chat)},
            "/v1/responses": {"post": _post("createResponse", responses)},
            "/v1/models": {"get": _get("listModels", [])},
            "/v1/generation": {"get": _get("getGeneration", [_query("id", required=True)])},
            "/v1/fusion/runs": {
                "get": _get(
                    "listRuns",
                    [
                        _query(name)
                        for name in (
                            "limit",
                            "cursor",
                            "preset",
                            "status",
                            "kind",
                            "key",
                            "since",
                            "until",
                            "q",
                        )
                    ],
                )
            },
            "/v1/fusion/runs/{run_id}": {
                "get": _get(
                    "getRun",
                    [{"name": "run_id", "in": "path", "required": True, **STRING}],
                )
            },
            "/health": {"get": _get("health", [])},
            "/metrics": {"get": _get("metrics", [])},
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }


def _post(operation: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": operation,
        "parameters": DEPTH_PARAMETERS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {
                "description": "the answer: JSON, or server-sent events with `stream: true`",
            },
            **ERRORS,
        },
    }


def _get(operation: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "operationId": operation,
        "parameters": parameters,
        "responses": {"200": {"description": "OK"}, **ERRORS},
    }


def _query(name: str, *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, **STRING}
