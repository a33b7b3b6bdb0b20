"""Slow and idle clients (issue 11, defect 5) against short deadlines (0.3 s): a connection that
sends nothing, headers or a body trickled byte by byte, an idle keep-alive connection and a
client that stops reading its stream are all closed; past --max-connections new connections get
a 503 with Retry-After. Raw sockets on 127.0.0.1; afterwards the server serves normally."""

from __future__ import annotations

import json
import socket
import time

import pytest

from qwen35.server.transport import TransportLimits
from server_fakes import FakeEngine, assert_recovered, serving, wait_until

SHORT = TransportLimits(
    max_connections=6,
    timeout_headers_s=0.3,
    timeout_body_s=0.3,
    timeout_keep_alive_s=0.3,
    timeout_write_s=0.3,
)


@pytest.fixture
def server():
    gen = serving()
    start = next(gen)
    eng = FakeEngine(max_model_len=4096)
    srv, _ = start(eng, transport=SHORT)
    yield srv, eng
    gen.close()


def _connect(srv, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)  # a server that never closes fails the test here
    s.connect(("127.0.0.1", srv.port))
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _trickle(s: socket.socket, data: bytes, period: float = 0.05) -> None:
    """Send one byte per period until the data is out or the server hangs up."""
    try:
        for b in data:
            s.send(bytes([b]))
            time.sleep(period)
    except OSError:  # closed by the server
        pass


def _request(body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % n
    ) + body


def test_idle_and_slow_connections_are_closed(server):
    srv, eng = server
    # connected, never sends a byte
    s = _connect(srv)
    assert _read_until_closed(s).startswith(b"HTTP/1.1 408")
    # headers trickled at 20 bytes/s: the deadline counts from the first byte, not the last
    s = _connect(srv)
    _trickle(s, _request(b"{}")[:12])
    assert _read_until_closed(s).startswith(b"HTTP/1.1 408")
    # a body trickled at 20 bytes/s
    s = _connect(srv)
    s.sendall(_request(b"", length=200) + b"{")
    _trickle(s, b'"prompt": "x"' + b" " * 5)
    reply = _read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 408")
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_timeout")
    # a keep-alive connection left idle after its response
    s = _connect(srv)
    s.sendall(_request(b'{"prompt": "x", "max_tokens": 1}'))
    reply = _read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1
    assert len(eng.added) == 1  # nothing from the slow clients reached the engine
    assert_recovered(srv)


def test_connection_limit_refuses_with_503_then_recovers(server):
    srv, _ = server
    held = [_connect(srv) for _ in range(SHORT.max_connections)]
    wait_until(lambda: len(srv.server.server_state.connections) == SHORT.max_connections)
    s = _connect(srv)
    reply = _read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "too_many_connections"
    for h in held:
        h.close()
    wait_until(lambda: not srv.server.server_state.connections)
    assert_recovered(srv)


def test_client_that_stops_reading_is_dropped_and_aborted(server):
    srv, eng = server
    eng.step_delay = 0.002  # the whole reply would take > 6 s: the stall comes first
    s = _connect(srv, rcvbuf=4096)
    body = {"prompt": "x", "n": 64, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    s.sendall(_request(json.dumps(body).encode()))
    # never read: the server's buffers fill, writing stalls, the write deadline drops the client
    wait_until(lambda: len(eng.aborted) == 1, timeout=60)
    assert eng.added[0][0] == eng.aborted[0]
    s.close()
    assert_recovered(srv)
