"""A request's head has a size limit and a time limit (``server/protocol.py``, the protocol
``openfusion serve`` runs and ``run_server`` too): an oversized header block gets 431 and
the connection closes, an endless one is cut off, and a head that never finishes (slowloris)
does not hold its connection. Raw sockets against a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest
from server_fixtures import RunningServer, setup_demo

MAX_HEADER = 4096


@pytest.fixture
def server(serve: Any) -> RunningServer:
    demo = setup_demo(f"[server]\nmax_header_bytes = {MAX_HEADER}\nheader_timeout_seconds = 0.5\n")
    return serve(demo.settings, demo.registry)  # type: ignore[no-any-return]


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (the 10 s socket timeout fails the
    test if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def head(extra: str) -> bytes:
    return f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode()


def test_a_head_within_the_limit_is_served(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(head(f"X-Pad: {'a' * (MAX_HEADER - 200)}\r\n"))
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("split", [False, True])
def test_an_oversized_head_gets_431(server: RunningServer, split: bool) -> None:
    """Sent at once, or in pieces (httptools would buffer the pieces without end)."""
    request = head("".join(f"X-Pad-{i}: {'a' * 100}\r\n" for i in range(60)))
    with connect(server) as sock:
        if split:
            for i in range(0, len(request), 500):
                sock.sendall(request[i : i + 500])
        else:
            sock.sendall(request)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert f"exceed {MAX_HEADER} bytes".encode() in answer


def test_one_endless_header_is_cut_off(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        answer = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(100):  # up to 400 KB; the server stops reading long before
                sock.sendall(b"a" * 4096)
        with contextlib.suppress(ConnectionResetError):
            answer = read_all(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_a_head_that_never_finishes_is_dropped(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        assert read_all(sock) == b""  # closed by the server, not by the socket's timeout


def test_a_body_is_not_counted_as_head(server: RunningServer) -> None:
    """A body larger than the head limit, sent with its head in one write, is read whole."""
    body = b'{"model": "openfusion/demo", "messages": [{"role": "user", "content": "%s"}]}' % (
        b"x" * (MAX_HEADER * 2)
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with connect(server) as sock:
        sock.sendall(request)
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_serve_runs_uvicorn_with_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``openfusion serve`` hands uvicorn the limited protocol and the configured limits."""
    import uvicorn
    from click.testing import CliRunner

    from openfusion.cli import main

    setup_demo("[server]\nmax_header_bytes = 8192\nheader_timeout_seconds = 3.0\n")
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    result = CliRunner().invoke(main, ["serve", "--port", "1"])
    assert result.exit_code == 0, result.output
    (options,) = calls
    assert options["http"] == "openfusion.server.protocol:LimitedHttpToolsProtocol"
    assert options["h11_max_incomplete_event_size"] == 8192
    assert options["timeout_keep_alive"] == 3.0
