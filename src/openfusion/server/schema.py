"""The request body of ``POST /v1/chat/completions``, validated once at the edge.

Strict types: ``"0.5"`` is not a temperature. Unknown OpenAI parameters are accepted and
ignored, as OpenAI-compatible servers do; unknown fields inside the fusion parameters are errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openfusion.types import Message, ToolCall

MAX_PANEL = 8
MAX_TOOL_CALLS = 16


class _Edge(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Edge):
    type: str
    text: str | None = None


class FunctionCallIn(_Edge):
    name: str
    arguments: str


class ToolCallIn(_Edge):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Edge):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, value: str | list[ContentPart] | None
    ) -> str | list[ContentPart] | None:
        if isinstance(value, list):
            for part in value:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"only text content parts are supported, not {part.type!r}")
        return value

    def to_message(self) -> Message:
        role = "system" if self.role == "developer" else self.role
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()
        )
        return Message(role, self.text(), tool_calls=calls, tool_call_id=self.tool_call_id)


class FusionParams(BaseModel):
    """The fusion plugin's / tool's parameters (OpenRouter's field names)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    analysis_models: list[str] | None = Field(None, min_length=1, max_length=MAX_PANEL)
    model: str | None = None
    """The judge."""
    preset: str | None = None
    max_tool_calls: int | None = Field(None, ge=1, le=MAX_TOOL_CALLS)
    tools: list[dict[str, Any]] | None = None
    """Tools panel members may use, e.g. ``[{"type": "web_search"}]``; ``[]`` turns them off."""


class Plugin(FusionParams):
    id: str

    @field_validator("id")
    @classmethod
    def _fusion_only(cls, value: str) -> str:
        if value != "fusion":
            raise ValueError(f"unsupported plugin {value!r}; this server offers 'fusion'")
        return value


class FunctionSpec(_Edge):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class Tool(_Edge):
    type: str
    function: FunctionSpec | None = None
    parameters: FusionParams | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ("function", "openrouter:fusion"):
            raise ValueError(
                f"unsupported tool type {value!r}; use 'function' or 'openrouter:fusion'"
            )
        return value


class ChatCompletionRequest(_Edge):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    models: list[str] | None = Field(None, min_length=1, max_length=MAX_PANEL)
    """Fallback models for a plain call, tried in order (OpenRouter's ``models``)."""
    plugins: list[Plugin] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    n: int | None = Field(None, ge=1, le=1)
    max_cost: float | None = Field(None, gt=0)
    """USD: calls that could overrun it are not started (openfusion's own field)."""

    @field_validator("messages")
    @classmethod
    def _has_user_text(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" and m.text().strip() for m in value):
            raise ValueError("needs at least one user message with text")
        return value

    @property
    def fusion_params(self) -> FusionParams | None:
        """The fusion plugin's or tool's parameters, if the request asks for the caller tier."""
        for plugin in self.plugins or ():
            return plugin
        for tool in self.tools or ():
            if tool.type == "openrouter:fusion":
                return tool.parameters or FusionParams()
        return None

    @property
    def function_tools(self) -> list[FunctionSpec]:
        return [t.function for t in self.tools or () if t.type == "function" and t.function]

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
