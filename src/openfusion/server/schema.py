"""The request body of ``POST /v1/chat/completions``, validated once at the edge.

Strict types: ``"0.5"`` is not a temperature. Every field is honoured or refused, never
silently dropped: a chat-completions field this server cannot honour (``logprobs``,
``logit_bias``, ``audio``...) is a 400 that names it and says why, and so is a field it does
not know at all. Inside messages and content parts, unknown keys are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from openfusion.presets import MAX_PANEL, MAX_TOOL_CALLS
from openfusion.types import Effort, Message, Reasoning, ToolCall

REFUSED: dict[str, str] = {
    "logprobs": "this server does not return log probabilities",
    "top_logprobs": "this server does not return log probabilities",
    "logit_bias": "token ids differ between models; this server cannot apply them",
    "audio": "this server answers in text only",
    "modalities": "this server answers in text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "use the fusion plugin's tools (web_search) instead",
    "functions": "deprecated by OpenAI: send tools instead",
    "function_call": "deprecated by OpenAI: send tool_choice instead",
    "store": "OpenAI's stored completions are not offered (runs are: GET /v1/fusion/runs)",
    "service_tier": "this server has one service tier",
    "prompt_cache_key": "this server does not route by cache key",
    "safety_identifier": "send user instead",
    "verbosity": "not supported by this server",
    "top_k": "not supported by this server (use top_p)",
    "top_a": "not supported by this server (use top_p)",
    "min_p": "not supported by this server (use top_p)",
    "repetition_penalty": "not supported by this server (use frequency_penalty)",
    "provider": "OpenRouter's provider routing is not supported by this server",
    "transforms": "OpenRouter's message transforms are not supported by this server",
    "route": "OpenRouter's routing is not supported by this server; send models for fallbacks",
}
"""Chat-completions (and OpenRouter) fields refused when set to anything but their no-op
value (``null``, ``false``, empty): field → why."""
NO_OP: tuple[Any, ...] = (None, False, [], {}, ["text"], "disabled")

MAX_COST_USD = 1_000_000.0
"""The largest ``max_cost`` accepted (USD per request): a finite amount, far from the limits
of the ledger's integer nano-USD."""


def without_refused(data: Any, refused: dict[str, str]) -> Any:
    """``data`` without the refused fields set to a no-op value; a ``ValueError`` naming
    each refused field set to anything else, and why."""
    if not isinstance(data, dict):
        return data
    problems = [f"{name}: {why}" for name, why in refused.items() if data.get(name) not in NO_OP]
    if problems:
        raise ValueError("; ".join(problems))
    return {k: v for k, v in data.items() if k not in refused}


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


class ReasoningIn(BaseModel):
    """OpenRouter's ``reasoning``: how much a reasoning model may think."""

    model_config = ConfigDict(strict=True, extra="forbid")

    effort: Effort | None = None
    max_tokens: int | None = Field(None, gt=0)

    def value(self) -> Reasoning:
        return Reasoning(self.effort, self.max_tokens)


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
    max_completion_tokens: int | None = Field(None, gt=0)
    """A cap on every inner call (panel and judge), reasoning tokens included."""
    reasoning: ReasoningIn | None = None
    """Sent to the panel and judge models that support it."""


class Plugin(FusionParams):
    id: str = Field(json_schema_extra={"enum": ["fusion"]})  # the validator words the error

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
    type: str = Field(json_schema_extra={"enum": ["function", "openrouter:fusion"]})
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


class StreamOptions(_Edge):
    include_usage: bool | None = None
    """Usage always rides on the last chunk; ``false`` is accepted and changes nothing."""


class UsageOption(_Edge):
    include: bool | None = None
    """OpenRouter's ``usage: {include}``: usage (with cost) is always included."""


class ChatCompletionRequest(_Edge):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    reasoning: ReasoningIn | None = None
    reasoning_effort: Effort | None = None
    """OpenAI's flat form of ``reasoning.effort``."""
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    """Kept with the generation (``GET /v1/generation``), as OpenAI keeps it with a completion."""
    models: list[str] | None = Field(None, min_length=1, max_length=MAX_PANEL)
    """Fallback models for a plain call, tried in order (OpenRouter's ``models``)."""
    plugins: list[Plugin] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream_options: StreamOptions | None = None
    usage: UsageOption | None = None
    max_cost: float | None = Field(None, gt=0, le=MAX_COST_USD, allow_inf_nan=False)
    """USD: calls that could overrun it are not started (openfusion's own field). Finite and
    at most ``MAX_COST_USD``, so it is an amount the ledger can hold."""

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        return without_refused(data, REFUSED)

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
        spec = value.get("json_schema")
        if kind == "json_schema" and not (
            isinstance(spec, dict) and isinstance(spec.get("schema"), dict)
        ):
            raise ValueError("json_schema needs an object with a 'schema' (a JSON schema)")
        return None if kind == "text" else value

    @field_validator("tool_choice")
    @classmethod
    def _known_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("auto", "required", "none"):
            raise ValueError(f"must be 'auto', 'required', 'none' or a function, not {value!r}")
        if isinstance(value, dict):
            function = value.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if value.get("type", "function") != "function" or not isinstance(name, str) or not name:
                raise ValueError(
                    'a function choice is {"type": "function", "function": {"name": "<name>"}} '
                    "naming one of your functions"
                )
        return value

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

    @property
    def reasoning_value(self) -> Reasoning | None:
        """``reasoning``, or OpenAI's ``reasoning_effort`` in its shape."""
        if self.reasoning is not None:
            return self.reasoning.value()
        return Reasoning(self.reasoning_effort) if self.reasoning_effort else None

    @property
    def named_tool(self) -> str | None:
        """The function ``tool_choice`` names, if it names one."""
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"].get("name")
            return name if isinstance(name, str) else None
        return None
