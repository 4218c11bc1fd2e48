"""The tool protocol: a typed async function, its JSON schema, and a registry that calls it.

A tool is a plain ``async def`` whose parameters are annotated (``Annotated[str, Field(
description=...)]`` for a described parameter); its docstring is the description the model
sees. The JSON schema of its arguments is built from the signature by pydantic, and the same
pydantic model validates the arguments a model sends.

``ToolRegistry.call`` never raises (except for cancellation): an unknown tool, arguments that
are not JSON or do not validate, and an exception inside the tool all come back as a
``ToolResult`` whose ``error`` tells the model what went wrong and what to do. Successful output
is fenced as untrusted data (see ``fence``).

Annotations are resolved with ``typing.get_type_hints``: under ``from __future__ import
annotations`` they must name types visible in the defining module's globals (module-level
``Annotated`` aliases work; names local to an enclosing function do not).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import typing
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, ValidationError

from openfusion.errors import OpenFusionError
from openfusion.settings import describe_validation_error
from openfusion.tools.fence import fence
from openfusion.types import ToolSpec

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_MAX_CHARS = 8000


@dataclass(frozen=True, slots=True)
class Source:
    """Where a piece of tool output came from, for citations."""

    title: str
    url: str
    """An http(s) URL, or a ``file://`` URL of a local document."""
    snippet: str
    source: str
    """The backend that found it: ``corpus``, ``searxng``, ``tavily``, ``web_fetch``..."""


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """What a tool function returns (a plain ``str`` is accepted too: no sources, cost unknown)."""

    text: str
    sources: tuple[Source, ...] = ()
    cost: float | None = None
    """USD spent on this call; ``0.0`` for local work, ``None`` when unknown."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The outcome of one call, ready to hand back to the model as a tool message."""

    content: str
    """What the model reads: the output, or ``Tool error.`` and the error, fenced as untrusted
    data."""
    sources: tuple[Source, ...] = ()
    cost: float | None = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ToolError(OpenFusionError):
    """A tool could not do what it was asked; the message says why and what to try instead.

    Raised inside a tool, it becomes ``ToolResult.error`` with exactly this message.
    """

    def __init__(self, message: str, *, cost: float | None = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.cost = cost


ToolFunction = Callable[..., Awaitable[ToolOutput | str]]


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Tool:
    """A named async function with a JSON schema of its parameters."""

    name: str
    description: str
    fn: ToolFunction
    arguments: type[BaseModel]
    """Validates the arguments a model sends; its JSON schema is ``parameters``."""
    price: float | None = None
    """The most one call costs (USD): ``0.0`` for local work, ``None`` when unknown (a
    budget then refuses to run it, unless ``prices.toml`` prices it under ``[tools]``)."""

    @classmethod
    def from_function(
        cls,
        fn: ToolFunction,
        name: str | None = None,
        description: str | None = None,
        *,
        price: float | None = None,
    ) -> Tool:
        """Build a tool from a typed ``async def``: schema from its signature, text from its doc."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"tool {fn.__name__!r} must be an `async def` function")
        tool_name = name or fn.__name__
        doc = description if description is not None else inspect.getdoc(fn)
        if not doc:
            raise TypeError(f"tool {tool_name!r} needs a description: give it a docstring")
        hints = typing.get_type_hints(fn, include_extras=True)
        fields: dict[str, Any] = {}
        for param in inspect.signature(fn).parameters.values():
            if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                raise TypeError(
                    f"tool {tool_name!r}: parameter {param.name!r} must be a plain named "
                    "parameter (no *args, **kwargs or positional-only)"
                )
            if param.name not in hints:
                raise TypeError(f"tool {tool_name!r}: parameter {param.name!r} needs a type")
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hints[param.name], default)
        arguments = pydantic.create_model(f"{tool_name}_arguments", __base__=_Arguments, **fields)
        return cls(name=tool_name, description=doc, fn=fn, arguments=arguments, price=price)

    @functools.cached_property  # built once: every member turn of every run asks for it
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments (an object; no pydantic titles)."""
        schema = self.arguments.model_json_schema()
        return _without_titles(schema)

    @functools.cached_property
    def spec(self) -> ToolSpec:
        return ToolSpec(name=self.name, description=self.description, parameters=self.parameters)


def tool(fn: ToolFunction) -> Tool:
    """Decorator form of ``Tool.from_function``."""
    return Tool.from_function(fn)


def _without_titles(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if k != "title"}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {
            key: {k: v for k, v in prop.items() if k != "title"}
            for key, prop in out["properties"].items()
        }
    return out


class ToolRegistry:
    """The tools a model may call, by name. ``call`` turns every failure into a ``ToolResult``."""

    def __init__(
        self, tools: typing.Iterable[Tool] = (), *, output_max_chars: int = DEFAULT_OUTPUT_MAX_CHARS
    ) -> None:
        self._tools: dict[str, Tool] = {}
        self.output_max_chars = output_max_chars
        for t in tools:
            self.register(t)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(t.spec for t in self._tools.values())

    async def call(self, name: str, arguments_json: str) -> ToolResult:
        """Run one tool call as a model wrote it. Never raises, except ``CancelledError``."""
        found = self._tools.get(name)
        if found is None:
            available = ", ".join(self._tools) or "none"
            return self._failure(
                name, f"unknown tool {name!r}; the available tools are: {available}"
            )
        try:
            raw = json.loads(arguments_json) if arguments_json.strip() else {}
        except json.JSONDecodeError as exc:
            return self._failure(
                name,
                f"the arguments are not valid JSON ({exc.msg} at position {exc.pos}); "
                f"send one JSON object matching the {name} schema",
            )
        if not isinstance(raw, dict):
            return self._failure(
                name, f"the arguments must be a JSON object, not {type(raw).__name__}"
            )
        try:
            parsed = found.arguments.model_validate(raw)
        except ValidationError as exc:
            return self._failure(
                name,
                f"invalid arguments: {describe_validation_error(exc)}; fix them and call again",
            )
        kwargs = {field: getattr(parsed, field) for field in type(parsed).model_fields}
        try:
            output = await found.fn(**kwargs)
        except ToolError as exc:
            return self._failure(name, exc.message, cost=exc.cost)
        except Exception as exc:  # a bug or an unexpected failure inside the tool
            logger.debug("tool %s raised", name, exc_info=True)
            return self._failure(name, f"failed: {type(exc).__name__}: {exc}", cost=None)
        if isinstance(output, str):
            output = ToolOutput(text=output)
        return ToolResult(
            content=fence(name, output.text, self.output_max_chars),
            sources=output.sources,
            cost=output.cost,
        )

    def _failure(self, name: str, message: str, *, cost: float | None = 0.0) -> ToolResult:
        logger.debug("tool %s: %s", name, message)
        error = f"{name}: {message}"
        content = "Tool error. " + fence(name, error, self.output_max_chars)
        return ToolResult(content=content, cost=cost, error=error)
