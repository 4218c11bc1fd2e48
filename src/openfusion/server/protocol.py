"""The HTTP protocol ``openfusion serve`` runs: uvicorn's httptools one, with the two limits on
a request's head that it lacks.

uvicorn bounds a header block only on its h11 protocol (``h11_max_incomplete_event_size``), and
its keep-alive timer stops at a request's first byte; httptools — the fast parser, which the
benchmarks want — buffers headers without bound and waits for the rest of them forever. So a
client could hold memory with one endless header, or a connection with one byte a minute
(slowloris). This subclass counts the bytes of each request's head and answers
``431 Request Header Fields Too Large`` past uvicorn's ``h11_max_incomplete_event_size`` (the
same limit h11 applies), and closes a connection whose head is not complete within
``timeout_keep_alive`` of its first byte (or of the connection, for the first request) — the
same time an idle keep-alive connection gets. The body and the time a response takes are not
touched. Both come from the uvicorn ``Config``, so worker processes need no other state.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["LimitedHttpToolsProtocol", "uvicorn_options"]

DEFAULT_MAX_HEADER_BYTES = 16_384
LINGER_SECONDS = 2.0
"""How long a refused connection still reads (and drops) what its client sends."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a cap on the size of, and the time to read, a request head."""

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.max_header_bytes = config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES
        self.header_timeout = float(config.timeout_keep_alive)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # refused: what still arrives is read and dropped
            return
        in_head_before = self._in_head
        super().data_received(data)
        if in_head_before and self._in_head and not self.transport.is_closing():
            # The head is still incomplete after this chunk: httptools holds all of it.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        if self._head_bytes > self.max_header_bytes:
            self._refuse_head()
            return
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        message = f"request header fields exceed {self.max_header_bytes} bytes"
        body = f'{{"error": {{"code": 431, "message": "{message}", "metadata": {{}}}}}}'
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body.encode()
        )
        # A lingering close: closing at once, with bytes the client is still sending unread,
        # makes the kernel reset the connection, and a reset can drop the 431 before the
        # client reads it. So: end our side (FIN), drop what still arrives, close soon.
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(max_header_bytes: int, header_timeout: float) -> dict[str, Any]:
    """The ``uvicorn.run``/``uvicorn.Config`` arguments that set both limits (an import string
    for the protocol: worker processes import it by name)."""
    return {
        "http": f"{__name__}:LimitedHttpToolsProtocol",
        "h11_max_incomplete_event_size": max_header_bytes,
        "timeout_keep_alive": header_timeout,
    }
