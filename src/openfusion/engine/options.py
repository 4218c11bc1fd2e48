"""What a request asks of a fusion's calls beyond its preset, and where each field goes.

- Sampling (``temperature``, ``top_p``, the penalties) shapes the panel's answers (and the
  caller's, in the caller tier). The judge's analysis always runs at temperature 0.
- ``seed``: member ``i`` of the panel gets ``seed + i`` (distinct samples, reproducible).
- ``reasoning`` and ``user`` go to every call, of the models that honour them.
- ``max_completion_tokens`` caps every inner call (panel and judge), like the preset's.
- ``max_tokens``, ``stop`` and ``response_format`` shape the answer the client reads: the
  judge's synthesis, or the caller's answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from openfusion.types import CompletionRequest, Reasoning


@dataclass(frozen=True, slots=True)
class RunOptions:
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    reasoning: Reasoning | None = None
    user: str | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    response_format: dict[str, Any] | None = None

    @property
    def structured(self) -> bool:
        """The answer must be JSON: nothing may be appended to it (no Sources list)."""
        return self.response_format is not None and self.response_format.get("type") != "text"

    def request(self, **fields: Any) -> CompletionRequest:
        """A new request of ``fields`` shaped by this run: ``answer(sampling(
        CompletionRequest(**fields)))`` built at once (the caller's calls and every plain
        request start here; two copies of a request were a measurable part of a pass-through)."""
        return CompletionRequest(
            **fields,
            **self._sampling(),
            max_tokens=self.max_tokens,
            stop=self.stop,
            response_format=self.response_format,
        )

    def sampling(self, request: CompletionRequest) -> CompletionRequest:
        """``request`` with this run's sampling fields (those set)."""
        return dataclasses.replace(request, **self._sampling())

    def _sampling(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def answer(self, request: CompletionRequest) -> CompletionRequest:
        """``request`` shaped as the client's answer: its length, stop sequences and format."""
        return dataclasses.replace(
            request,
            max_tokens=cap(request.max_tokens, self.max_tokens),
            stop=self.stop or request.stop,
            response_format=self.response_format,
        )


def cap(*limits: int | None) -> int | None:
    """The smallest of the limits that are set (``None`` if none is)."""
    given = [limit for limit in limits if limit is not None]
    return min(given) if given else None
