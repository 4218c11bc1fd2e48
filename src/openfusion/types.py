"""Provider-neutral request and response types.

Plain frozen dataclasses: the engine, the providers and the CLI all speak these, and only the
edges (HTTP, config, judge JSON) use pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


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
        )

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape, plus OpenRouter's ``cost``."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "cost": self.cost,
        }


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
    tool_choice: str | None = None
    """``auto``, ``required`` or ``none``; ``None`` leaves it to the provider."""


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
