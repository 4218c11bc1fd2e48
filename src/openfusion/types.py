"""Provider-neutral request and response types.

Plain frozen dataclasses: the engine, the providers and the CLI all speak these, and only the
edges (HTTP, config, judge JSON) use pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
Effort = Literal["xhigh", "high", "medium", "low", "minimal", "none"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function a model may call: name, description and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments as the model wrote them: JSON text, not yet parsed."""


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """On an assistant message: the calls it made."""
    tool_call_id: str | None = None
    """On a tool message: the call it answers."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and cost of one call, or a sum of calls.

    ``cost`` is USD; ``None`` means "not known", never "free". A sum that includes an unknown
    cost is unknown too, so a total is never silently understated.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float | None = 0.0
    reported: bool = True
    """False when the upstream reported no usage: the token counts are not known, so no cost
    may be computed from them (it stays ``None``, never $0 for "zero tokens")."""
    estimated: bool = False
    """True when the counts (and so the cost) were estimated from the text, e.g. for a stream
    cut after text was sent, which the upstream bills although it never reported usage."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        cost = None if self.cost is None or other.cost is None else self.cost + other.cost
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cost=cost,
            reported=self.reported and other.reported,
            estimated=self.estimated or other.estimated,
        )

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape, plus OpenRouter's ``cost`` and whether it is ``estimated``."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "cost": self.cost,
            "estimated": self.estimated,
        }


@dataclass(frozen=True, slots=True)
class Reasoning:
    """How much a reasoning model may think (OpenRouter's ``reasoning`` object)."""

    effort: Effort | None = None
    max_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.effort is not None:
            data["effort"] = self.effort
        if self.max_tokens is not None:
            data["max_tokens"] = self.max_tokens
        return data


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One call to one model. ``model`` is the provider's own name (no provider prefix)."""

    model: str
    messages: tuple[Message, ...]
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None
    """When set, the answer must be JSON matching this schema (constrained where the model can)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra headers for HTTP providers (the fusion depth header rides here)."""
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | dict[str, Any] | None = None
    """``auto``, ``required`` or ``none``, or OpenAI's ``{"type": "function", "function":
    {"name": ...}}`` for one tool; ``None`` leaves it to the provider."""
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    """OpenAI's ``response_format`` for the answer (``json_object`` or ``json_schema``), as the
    client sent it; the engine's own JSON requests use ``json_schema``."""
    reasoning: Reasoning | None = None
    user: str | None = None
    """The end user's id, for the upstream's abuse monitoring."""
    parallel_tool_calls: bool | None = None


OPTIONAL_FIELDS = frozenset(
    {
        "seed",
        "stop",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "reasoning",
        "user",
        "parallel_tool_calls",
    }
)
"""The fields of a ``CompletionRequest`` a provider may not honour (it says which it does)."""


def fields_set(request: CompletionRequest) -> list[str]:
    """The optional fields ``request`` sets, in a stable order."""
    empty: tuple[Any, ...] = (None, ())
    return sorted(f for f in OPTIONAL_FIELDS if getattr(request, f) not in empty)


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    usage: Usage
    model: str
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a streamed completion. The last chunk carries ``usage`` and ``finish_reason``."""

    delta: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls the model made, each whole (streamed pieces are joined before they are passed on)."""
