"""Cut a document's text into overlapping chunks for the search index.

A chunk is at most ``size + overlap`` characters. Cuts fall on the coarsest boundary that
fits: a blank line (paragraph), else a line break, else the end of a sentence, else a space;
a single word longer than ``size`` is cut where it must. Each chunk after the first starts with
the last ``overlap`` characters (whole words) of the one before, so a passage that straddles a
cut is still found whole in one of them.
"""

from __future__ import annotations

import re

CHUNK_SIZE = 850
CHUNK_OVERLAP = 150

_SEPARATORS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?;:])\s+"))
_SPACE = re.compile(r"\s+")


def chunk_text(text: str, size: int = CHUNK_SIZE, overlap: int = CHUNK_OVERLAP) -> list[str]:
    if size <= 0 or overlap < 0 or overlap >= size:
        raise ValueError("need size > 0 and 0 <= overlap < size")
    pieces = _pieces(text.strip(), size, 0)
    chunks: list[str] = []
    current = ""
    for piece, joiner in pieces:
        if current and len(current) + len(joiner) + len(piece) > size:
            chunks.append(current)
            tail = _tail(current, min(overlap, size + overlap - len(piece) - 1))
            current = f"{tail} {piece}" if tail else piece
        else:
            current = f"{current}{joiner}{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def _pieces(text: str, size: int, level: int) -> list[tuple[str, str]]:
    """Split ``text`` into (piece, joiner) pairs, each piece at most ``size`` characters."""
    if len(text) <= size:
        return [(text, "\n\n")] if text else []
    if level == len(_SEPARATORS):
        return _words(text, size)
    joiner = ("\n\n", "\n", " ")[level]
    out: list[tuple[str, str]] = []
    for part in _SEPARATORS[level].split(text):
        part = part.strip()
        if part:
            sub = _pieces(part, size, level + 1)
            if sub:
                out.append((sub[0][0], joiner))
                out.extend(sub[1:])
    return out


def _words(text: str, size: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for word in _SPACE.split(text):
        while len(word) > size:
            out.append((word[:size], " "))
            word = word[size:]
        if word:
            out.append((word, " "))
    return out


def _tail(chunk: str, overlap: int) -> str:
    if overlap <= 0:
        return ""
    if len(chunk) <= overlap:
        return chunk
    tail = chunk[-overlap:]
    space = tail.find(" ")
    return tail[space + 1 :] if 0 <= space < len(tail) - 1 else tail
