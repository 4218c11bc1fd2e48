"""Citations that were really retrieved.

The run's sources are every document a tool call returned, numbered in order of first
retrieval. The final answer cites them as ``[n]``; a ``[n]`` with no such source, and any URL in
an answer (panel or final) that no tool call returned, is *unverified*: it is listed as such and
never presented as a source. Verified citations become OpenAI-style ``url_citation``
annotations, and the cited sources are appended to the answer as a "Sources" list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from openfusion.engine.result import MemberResponse

MARKER = re.compile(r"\[(\d{1,3})\]")
SOURCES_HEADING = "\n\nSources:\n"
URL = re.compile(r"(?:https?|file)://[^\s<>\"'\]\)]+")


@dataclass(frozen=True, slots=True)
class SourceRef:
    number: int
    url: str
    title: str


@dataclass(frozen=True, slots=True)
class Citations:
    content: str
    """The answer, with the Sources list appended when it cites any."""
    annotations: tuple[dict[str, Any], ...]
    unverified: tuple[dict[str, str], ...]


def number_sources(sources: Iterable[tuple[str, str]]) -> list[SourceRef]:
    """``(url, title)`` pairs, deduplicated by URL, numbered from 1 in order of retrieval."""
    numbered: dict[str, SourceRef] = {}
    for url, title in sources:
        if url not in numbered:
            numbered[url] = SourceRef(len(numbered) + 1, url, title or url)
    return list(numbered.values())


def check(
    answer: str,
    sources: Sequence[SourceRef],
    responses: Sequence[MemberResponse],
    *,
    listing: bool = True,
) -> Citations:
    """Annotate ``answer``'s verified citations and list the unverified ones; ``listing``
    appends the cited sources (off when the answer must stay JSON)."""
    by_number = {s.number: s for s in sources}
    retrieved = {s.url for s in sources}
    unverified: list[dict[str, str]] = []
    annotations: list[dict[str, Any]] = []
    cited: list[SourceRef] = []
    for match in MARKER.finditer(answer):
        source = by_number.get(int(match.group(1)))
        if source is None:
            unverified.append({"where": "answer", "citation": match.group(0)})
            continue
        annotations.append(
            {
                "type": "url_citation",
                "url_citation": {
                    "url": source.url,
                    "title": source.title,
                    "start_index": match.start(),
                    "end_index": match.end(),
                },
            }
        )
        if source not in cited:
            cited.append(source)
    texts = [("answer", answer)] + [(r.name, r.content) for r in responses]
    for where, text in texts:
        for url in URL.findall(text):
            url = url.rstrip(".,;:")
            if url not in retrieved:
                unverified.append({"where": where, "citation": url})
    content = answer
    if cited and listing:
        lines = "\n".join(f"[{s.number}] {s.title} — {s.url}" for s in cited)
        content = f"{answer}{SOURCES_HEADING}{lines}"
    return Citations(content, tuple(annotations), tuple(unverified))


def without_sources(content: str) -> str:
    """The answer alone: the appended Sources list and the ``[n]`` markers taken out."""
    return MARKER.sub("", content.split(SOURCES_HEADING, 1)[0]).strip()
