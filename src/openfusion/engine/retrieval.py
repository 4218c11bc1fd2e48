"""The engine's own search (``[tools] retrieve``), and the extractive answer it allows.

A 270M model offered a search tool searched an unrelated corpus for every question and answered
with the fence markers or a sentence of the unrelated document. So for such a preset the engine
searches once itself, with the question, and keeps a hit only when the sentence it would quote
shares most of the question's content words: a search that returns nothing relevant adds
nothing. In select mode the answer is then that sentence, quoted and cited (``quote``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from openfusion.engine.citations import SourceRef
from openfusion.tools import ToolRegistry

MAX_RESULTS = 3
MIN_SHARED = 2
"""Content words of the question the quoted sentence must contain..."""
MIN_SHARE = 0.5
"""... and the share of them the whole hit must."""
STEM = 5
"""Words match on their first letters ("bombs" and "bomb", "stopped" and "stop")."""

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s+[-*•]\s+|…")
_MARKUP = re.compile(r"[*_`#>]+")
_LABEL = re.compile(r"^[\w ]{1,24}:\s+")
"""A list item's bold label ("resources: limits on ...")."""
_STOPWORDS = frozenset(
    [
        "a",
        "about",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "how",
        "i",
        "in",
        "into",
        "is",
        "it",
        "its",
        "may",
        "might",
        "must",
        "of",
        "on",
        "or",
        "should",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "this",
        "those",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "whose",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)


@dataclass(frozen=True, slots=True)
class Passage:
    url: str
    title: str
    sentence: str
    """The sentence of the hit that shares the most of the question's words."""
    share: float
    """The fraction of the question's content words the hit contains (title included)."""


def terms(text: str) -> set[str]:
    """Content words, plural "s" dropped, cut to their stems."""
    words = (w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 2)
    return {(w[:-1] if w.endswith("s") and len(w) > 3 else w)[:STEM] for w in words}


def best_sentence(question: str, title: str, text: str) -> tuple[str, float, int]:
    """The sentence of ``text`` sharing most content words with ``question``, the share of the
    question's words the hit has (title and whole text), and how many the sentence has."""
    wanted = terms(question)
    if not wanted:
        return "", 0.0, 0
    best, shared = "", 0
    for part in _SENTENCE_END.split(text):
        flat = " ".join(_MARKUP.sub("", part).split()).strip(" -:")
        if title and flat.lower().startswith(f"{title.lower()} "):  # the heading runs into it
            flat = flat[len(title) :].lstrip(" -:")
        sentence = _LABEL.sub("", flat)
        hits = len(wanted & terms(sentence))
        if sentence and hits > shared:
            best, shared = sentence, hits
    share = len(wanted & (terms(title) | terms(text))) / len(wanted)
    return best, share, shared


async def retrieve(question: str, tools: ToolRegistry | None) -> tuple[Passage, ...]:
    """Search with the question; the relevant hits, most relevant first (none on a failed
    search: the panel answers without)."""
    if tools is None or "web_search" not in tools:
        return ()
    arguments = json.dumps({"query": question, "max_results": MAX_RESULTS})
    result = await tools.call("web_search", arguments)
    if result.error:
        return ()
    found = []
    for source in result.sources:
        sentence, share, shared = best_sentence(question, source.title, source.snippet)
        if shared >= MIN_SHARED and share >= MIN_SHARE:
            found.append(Passage(source.url, source.title, sentence, share))
    return tuple(sorted(found, key=lambda p: -p.share))


def quote(passages: Sequence[Passage], sources: Sequence[SourceRef]) -> str:
    """The most relevant passage's sentence, quoted, cited as ``[n]`` (``""`` when none)."""
    numbers = {s.url: s.number for s in sources}
    for passage in passages:
        if passage.url in numbers:
            sentence = passage.sentence.rstrip(".;")
            return f'"{sentence}." [{numbers[passage.url]}]'
    return ""
