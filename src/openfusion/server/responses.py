"""``POST /v1/responses``: OpenAI's Responses API, over the same runs as chat completions.

The body becomes a chat completions body (``ResponsesRequest.to_chat``) and is planned by
``Completions.plan``, so fusion comes in the same three forms: a fusion model id, the
``fusion`` plugin, the ``openrouter:fusion`` tool. The response's ``output`` holds a
``fusion_call`` item per fusion (``status``, ``analysis``, ``responses``, ``failed_models``,
``sources``, ``failure_reason``), then the answer's ``message`` — or, in the caller tier, the
``function_call`` items of the client's functions the caller called.

Streamed, the events come in the reference's order: ``response.created``,
``response.in_progress``; per fusion ``response.output_item.added`` (the ``fusion_call``),
``response.fusion_call.in_progress``, per panel member ``.panel.added`` then
``.panel.completed`` (its content) or ``.panel.failed`` (error, status code),
``.analysis.in_progress`` (the judge model), ``.analysis.completed`` (the analysis),
``response.fusion_call.completed``, ``response.output_item.done``; then the answer
(``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., ``.output_text.done``, ``.content_part.done``,
``.output_item.done``), and last ``response.completed`` — or ``response.failed`` with the error.

Input items: messages (text parts only), ``function_call`` and ``function_call_output``.
``fusion_call`` items a client sends back (this server's own output) are left out of the
models' context: the assistant message that follows them says what they led to.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openfusion.engine import (
    FusionCallEvent,
    MemberEvent,
    MemberFailure,
    MemberResponse,
    StageEvent,
)
from openfusion.server.completions import Final, Output, Progress, Text
from openfusion.server.errors import APIError, from_validation
from openfusion.server.schema import MAX_COST_USD, ChatCompletionRequest, without_refused
from openfusion.types import ToolCall

if TYPE_CHECKING:
    from openfusion.server.app import Collected, Started

REFUSED: dict[str, str] = {
    "previous_response_id": "a response cannot be continued by id: send the conversation as input",
    "conversation": "this server keeps no conversations: send the conversation as input",
    "store": "a response cannot be fetched back by id (its run can: GET /v1/fusion/runs/{id})",
    "background": "background responses are not supported",
    "include": "this server has no extra output to include",
    "prompt": "stored prompts are not supported",
    "truncation": "this server does not truncate input",
    "service_tier": "this server has one service tier",
    "top_logprobs": "this server does not return log probabilities",
    "max_tool_calls": "set the fusion plugin's max_tool_calls instead",
    "prompt_cache_key": "this server does not route by cache key",
    "safety_identifier": "send user instead",
}
TEXT_PARTS = ("input_text", "output_text", "text")
ROLES = ("user", "system", "developer", "assistant")


class TextConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    format: dict[str, Any] | None = None
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "name", "schema"}``."""


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_output_tokens: int | None = Field(None, gt=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    plugins: list[dict[str, Any]] | None = None
    models: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    max_cost: float | None = Field(None, gt=0, le=MAX_COST_USD, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return without_refused(data, REFUSED)

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completions body (a 400 names what cannot be)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": _messages(self.input, self.instructions),
            "stream": self.stream,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_output_tokens,
            "tools": [_chat_tool(t) for t in self.tools] if self.tools is not None else None,
            "tool_choice": _chat_choice(self.tool_choice),
            "parallel_tool_calls": self.parallel_tool_calls,
            "plugins": self.plugins,
            "models": self.models,
            "reasoning": self.reasoning,
            "response_format": _chat_format(self.text),
            "metadata": self.metadata,
            "user": self.user,
            "max_cost": self.max_cost,
        }
        try:
            return ChatCompletionRequest.model_validate(
                {k: v for k, v in body.items() if v is not None}
            )
        except ValidationError as exc:
            raise from_validation(exc) from exc


def _messages(items: str | list[dict[str, Any]], instructions: str | None) -> list[Any]:
    """``input`` (and ``instructions``) as chat messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input.{index}"
        if kind == "message":
            messages.append({"role": _role(item, where), "content": _text(item, where)})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string(item, "name", where),
                    "arguments": _string(item, "arguments", where),
                },
            }
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", where),
                    "content": output if isinstance(output, str) else json.dumps(output),
                }
            )
        elif kind != "fusion_call":
            raise APIError(
                400,
                f"{where}.type: {kind!r} items are not supported; send messages, "
                "function_call and function_call_output items",
            )
    return messages


def _role(item: dict[str, Any], where: str) -> str:
    role = item.get("role")
    if role not in ROLES:
        raise APIError(400, f"{where}.role: must be one of {', '.join(ROLES)}, not {role!r}")
    return str(role)


def _text(item: dict[str, Any], where: str) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content: must be a string or a list of text parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(
                400, f"{where}.content.{index}: only text parts are supported, not {kind!r}"
            )
        texts.append(part["text"])
    return "".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key}: a string is required")
    return value


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses tool (functions are flat there) in the chat completions shape."""
    if tool.get("type") != "function":
        return tool
    spec = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
    return {"type": "function", "function": spec}


def _chat_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") == "openrouter:fusion":
        return {"type": "function", "function": {"name": "fusion"}}
    return {"type": "function", "function": {"name": choice.get("name")}}


def _chat_format(text: TextConfig | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``."""
    if text is None or text.format is None:
        return None
    form = text.format
    if form.get("type") != "json_schema":
        return form
    spec = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
    return {"type": "json_schema", "json_schema": spec}


# --- the response --------------------------------------------------------------------------


def usage(final: Final) -> dict[str, Any]:
    """Responses' usage shape, with OpenRouter's cost and how it was reached."""
    u = final.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens,
        "cost": u.cost,
        "cost_details": final.cost_details,
        "estimated": u.estimated,
    }


def fusion_item(item_id: str, fusion: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """A ``fusion_call`` output item from a fusion object (``FusionResult.to_dict``)."""
    failed = fusion.get("status") == "error"
    return {
        "type": "fusion_call",
        "id": item_id,
        "status": status or ("failed" if failed else "completed"),
        "judge": fusion.get("judge"),
        "analysis": fusion.get("analysis"),
        "responses": [
            {"model": r.get("name", r["model"]), "content": r["content"]}
            for r in fusion.get("responses", [])
        ],
        "failed_models": [
            {
                "model": f.get("name", f["model"]),
                "reason": f["reason"],
                "status": f["status"],
                "message": f["message"],
            }
            for f in fusion.get("failed_models", [])
        ],
        "sources": list(fusion.get("sources", [])),
        "failure_reason": fusion.get("failure_reason"),
        "error": fusion.get("failure_message"),
    }


def message_item(
    item_id: str, text: str, annotations: Any = (), status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": status,
        "content": [output_text(text, annotations)] if status == "completed" else [],
    }


def output_text(text: str, annotations: Any = ()) -> dict[str, Any]:
    """An ``output_text`` part; chat's nested ``url_citation`` annotations, flattened."""
    flat = [{"type": "url_citation", **a["url_citation"]} for a in annotations]
    return {"type": "output_text", "text": text, "annotations": flat, "logprobs": []}


def function_items(generation_id: str, calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function_call",
            "id": f"fc_{generation_id}_{i}",
            "call_id": c.id,
            "name": c.name,
            "arguments": c.arguments,
            "status": "completed",
        }
        for i, c in enumerate(calls)
    ]


def envelope(
    started: Started, body: ResponsesRequest, status: str, output: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ``response`` object around ``output``."""
    return {
        "id": started.generation_id,
        "object": "response",
        "created_at": started.created,
        "model": body.model,
        "status": status,
        "output": output,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "user": body.user,
        "usage": None,
    }


def response_body(started: Started, body: ResponsesRequest, whole: Collected) -> dict[str, Any]:
    """The whole response of a run that was not streamed."""
    final = whole.final
    output: list[dict[str, Any]] = []
    for call in whole.calls:  # the caller tier: an item per fusion it invoked
        item_id = f"fc_{started.generation_id}_{len(output)}"
        if call.state == "capped":
            output.append(_capped_item(item_id))
        elif call.state == "done" and call.result is not None:
            output.append(fusion_item(item_id, call.result.to_dict()))
    if final.fusion is not None and not whole.calls:  # a fusion model: its one fusion
        output.append(fusion_item(f"fc_{started.generation_id}_0", final.fusion))
    if final.tool_calls:
        output += function_items(started.generation_id, final.tool_calls)
    else:
        text = "".join(whole.texts)
        output.append(message_item(f"msg_{started.generation_id}", text, final.annotations))
    data = envelope(started, body, "completed", output)
    data["usage"] = usage(final)
    if final.fusion is not None:
        data["fusion"] = final.fusion
    return data


def _capped_item(item_id: str) -> dict[str, Any]:
    return {
        "type": "fusion_call",
        "id": item_id,
        "status": "failed",
        "analysis": None,
        "responses": [],
        "failed_models": [],
        "sources": [],
        "failure_reason": "fusion_invocation_capped",
        "error": "the fusion was invoked more often than allowed in one request",
    }


class ResponseStream:
    """A run as the Responses API's server-sent events (see the module docstring)."""

    def __init__(self, started: Started, body: ResponsesRequest) -> None:
        self.started = started
        self.body = body
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.fusion: dict[str, Any] | None = None
        """The open ``fusion_call`` item, while a fusion runs."""
        self.caller_tier = False
        """Fusions come as ``FusionCallEvent``s (else it is a fusion model's one fusion)."""
        self.message: dict[str, Any] | None = None
        self.text: list[str] = []

    # -- the Renderer protocol ------------------------------------------------------------

    def head(self) -> bytes:
        snapshot = envelope(self.started, self.body, "in_progress", [])
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def render(self, item: Output) -> bytes:
        if isinstance(item, Text):
            return self._text(item.delta)
        if isinstance(item, Progress):
            return self._progress(item.event)
        if isinstance(item, Final):
            return self._final(item)
        return b""

    def error(self, error: APIError) -> bytes:
        code = error.metadata.get("failure_reason") or _error_code(error.status)
        out = b""
        if self.fusion is not None:  # the fusion is what failed (every member, say)
            self.fusion.update(failure_reason=code, error=error.message)
            out = self._close_fusion("failed")
        snapshot = envelope(self.started, self.body, "failed", self.output)
        snapshot["error"] = {"code": code, "message": error.message, "status": error.status}
        return out + self._event("response.failed", response=snapshot)

    def tail(self) -> bytes:
        return b""

    # -- fusion ---------------------------------------------------------------------------

    def _progress(self, event: Any) -> bytes:
        if isinstance(event, FusionCallEvent):
            self.caller_tier = True
            if event.state == "running":
                return self._open_fusion()
            if event.state == "capped":
                return self._capped()
            if self.fusion is not None and event.result is not None:
                self.fusion.update(fusion_item(self.fusion["id"], event.result.to_dict()))
            return self._close_fusion()
        if isinstance(event, MemberEvent):
            out = self._open_fusion() if self.fusion is None else b""
            return out + self._member(event)
        if isinstance(event, StageEvent) and event.stage == "analysis":
            return self._analysis(event)
        return b""

    def _open_fusion(self) -> bytes:
        index = len(self.output)
        self.fusion = {
            "type": "fusion_call",
            "id": f"fc_{self.started.generation_id}_{index}",
            "status": "in_progress",
            "judge": None,
            "analysis": None,
            "responses": [],
            "failed_models": [],
            "sources": [],
            "failure_reason": None,
            "error": None,
        }
        self.output.append(self.fusion)
        return self._event(
            "response.output_item.added", output_index=index, item=dict(self.fusion)
        ) + self._fusion_event("response.fusion_call.in_progress")

    def _member(self, event: MemberEvent) -> bytes:
        assert self.fusion is not None
        if event.state == "running":
            return self._fusion_event("response.fusion_call.panel.added", model=event.name)
        outcome = event.outcome
        if event.state == "done":
            content = outcome.content if isinstance(outcome, MemberResponse) else ""
            self.fusion["responses"].append({"model": event.name, "content": content})
            return self._fusion_event(
                "response.fusion_call.panel.completed", model=event.name, content=content
            )
        if event.state == "failed":
            failed = outcome if isinstance(outcome, MemberFailure) else None
            failure = {
                "model": event.name,
                "reason": event.reason,
                "status": failed.status if failed else None,
                "message": failed.message if failed else event.reason or "failed",
            }
            self.fusion["failed_models"].append(failure)
            return self._fusion_event(  # the reference calls ``message`` "error", but the
                "response.fusion_call.panel.failed",  # openai SDK raises on an event with a
                model=event.name,  # top-level "error" key, so it is ``message`` here
                message=failure["message"],
                reason=event.reason,
                status_code=failure["status"],
            )
        return b""

    def _analysis(self, event: StageEvent) -> bytes:
        if self.fusion is None:
            return b""
        if event.state == "running":
            self.fusion["judge"] = event.model
            return self._fusion_event(
                "response.fusion_call.analysis.in_progress", judge_model=event.model
            )
        self.fusion["analysis"] = event.analysis
        self.fusion["sources"] = list(event.sources)
        if event.state == "failed":
            self.fusion["failure_reason"] = event.reason
        out = b""
        if event.state == "done":
            out = self._fusion_event(
                "response.fusion_call.analysis.completed", analysis=event.analysis
            )
        if not self.caller_tier:  # a fusion model: the fusion ends here, the answer follows
            out += self._close_fusion()
        return out

    def _close_fusion(self, status: str | None = None) -> bytes:
        item, self.fusion = self.fusion, None
        if item is None:
            return b""
        if status is not None:
            item["status"] = status
        elif item["status"] == "in_progress":
            item["status"] = "completed"
        index = self.output.index(item)
        return self._event(
            "response.fusion_call.completed", item_id=item["id"], output_index=index
        ) + self._event("response.output_item.done", output_index=index, item=item)

    def _capped(self) -> bytes:
        item = _capped_item(f"fc_{self.started.generation_id}_{len(self.output)}")
        self.output.append(item)
        index = len(self.output) - 1
        return self._event("response.output_item.added", output_index=index, item=item) + (
            self._event("response.output_item.done", output_index=index, item=item)
        )

    def _fusion_event(self, kind: str, **fields: Any) -> bytes:
        assert self.fusion is not None
        index = self.output.index(self.fusion)
        return self._event(kind, item_id=self.fusion["id"], output_index=index, **fields)

    # -- the answer -----------------------------------------------------------------------

    def _text(self, delta: str) -> bytes:
        out = b""
        if self.fusion is not None:  # text ends a fusion that did not say so (a bug's guard)
            out += self._close_fusion()
        if self.message is None:
            self.message = message_item(
                f"msg_{self.started.generation_id}", "", status="in_progress"
            )
            self.output.append(self.message)
            index = len(self.output) - 1
            out += self._event("response.output_item.added", output_index=index, item=self.message)
            out += self._message_event("response.content_part.added", part=output_text(""))
        self.text.append(delta)
        return out + self._message_event(
            "response.output_text.delta", content_index=0, delta=delta, logprobs=[]
        )

    def _final(self, final: Final) -> bytes:
        out = self._close_fusion() if self.fusion is not None else b""
        fused = [i for i in self.output if i["type"] == "fusion_call"]
        if final.fusion is not None and fused and not self.caller_tier:  # now with its sources
            fused[0].update(fusion_item(fused[0]["id"], final.fusion, fused[0]["status"]))
        if final.tool_calls:
            for item in function_items(self.started.generation_id, final.tool_calls):
                self.output.append(item)
                index = len(self.output) - 1
                out += self._event("response.output_item.added", output_index=index, item=item)
                out += self._event("response.output_item.done", output_index=index, item=item)
        elif self.message is None:  # an empty answer is still a message
            out += self._text("")
        if self.message is not None:
            text = "".join(self.text)
            part = output_text(text, final.annotations)
            out += self._message_event("response.output_text.done", content_index=0, text=text)
            out += self._message_event("response.content_part.done", content_index=0, part=part)
            self.message.update(status="completed", content=[part])
            index = self.output.index(self.message)
            out += self._event("response.output_item.done", output_index=index, item=self.message)
        snapshot = envelope(self.started, self.body, "completed", self.output)
        snapshot["usage"] = usage(final)
        if final.fusion is not None:
            snapshot["fusion"] = final.fusion
        return out + self._event("response.completed", response=snapshot)

    def _message_event(self, kind: str, **fields: Any) -> bytes:
        assert self.message is not None
        index = self.output.index(self.message)
        return self._event(kind, item_id=self.message["id"], output_index=index, **fields)

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _error_code(status: int) -> str:
    return {429: "rate_limit_exceeded", 402: "insufficient_credits", 408: "timeout"}.get(
        status, "server_error" if status >= 500 else "invalid_request"
    )
