"""Readable text out of HTML and PDF, shared by ``web_fetch`` and the corpus indexer.

HTML goes through trafilatura (main-content extraction, maintained, works offline, never
downloads anything at run time); a page where it finds no main content falls back to its plain
``html2txt``. PDF text comes from pypdf. Both are CPU-bound and synchronous: async callers run
them in a thread.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pypdf
import trafilatura
from pypdf.errors import PdfReadError

logger = logging.getLogger(__name__)


class ExtractionError(Exception):
    """The document could not be turned into text; the message says why."""


@dataclass(frozen=True, slots=True)
class Extracted:
    title: str | None
    text: str


def html_to_text(html: bytes | str) -> Extracted:
    """Main text and title of an HTML document (bytes: the encoding is detected)."""
    if not html:
        return Extracted(title=None, text="")
    doc = trafilatura.bare_extraction(
        html, with_metadata=True, include_comments=False, include_tables=True
    )
    title: str | None = None
    text: str | None = None
    if isinstance(doc, dict):
        title, text = doc.get("title"), doc.get("text")
    elif doc is not None:
        title, text = doc.title, doc.text
    if not text or not text.strip():
        text = trafilatura.html2txt(html)
    return Extracted(title=title or None, text=text.strip())


def pdf_to_text(data: bytes | Path) -> Extracted:
    """Text of every page of a PDF (pages separated by blank lines) and its metadata title."""
    try:
        reader = pypdf.PdfReader(io.BytesIO(data) if isinstance(data, bytes) else data)
        if reader.is_encrypted:
            raise ExtractionError("the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta = reader.metadata
        title = meta.title if meta is not None else None
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        logger.debug("pdf extraction failed", exc_info=True)
        raise ExtractionError(f"not a readable PDF ({type(exc).__name__}: {exc})") from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    return Extracted(title=(str(title).strip() or None) if title else None, text=text)
