"""Connection-level protection and the uvicorn run loop.

uvicorn (0.54) times out only idle keep-alive connections: a connection that never sends a
request, a client stuck in its headers and a 1-byte/s body are held forever, and its
`limit_concurrency` answers 503 per request but still accepts the sockets. `GuardedH11Protocol`
adds, per connection:

- a connection cap: past `max_connections` open connections a new one gets a 503 and is closed;
- a header deadline: the request line and headers must arrive within `timeout_headers_s` of the
  connection opening (or of the first byte of a later keep-alive request), else 408 and close;
- a body deadline: the whole body within `timeout_body_s` of the headers, else 408 and close
  (the handler sees a disconnect);
- a write deadline: a client that stops reading a response for `timeout_write_s` is dropped
  (its requests are aborted like any disconnect).

Idle keep-alive connections close after `timeout_keep_alive_s` (uvicorn's own timer).
`run_server` serves until a signal or until the engine loop dies, and returns the exit status
(1 after an engine failure, so a supervisor restarts the process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass, fields
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen35.errors import Qwen35Error

log = logging.getLogger("qwen35.server")


@dataclass(frozen=True)
class TransportLimits:
    max_connections: int = 1024
    timeout_headers_s: float = 10.0
    timeout_body_s: float = 60.0
    timeout_keep_alive_s: float = 5.0
    timeout_write_s: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                flag = "--" + f.name.removesuffix("_s").replace("_", "-")
                raise Qwen35Error(f"{flag} must be > 0, got {getattr(self, f.name)!r}")


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


_REFUSED = _raw_response(
    503, "Service Unavailable", "too many open connections; retry later", "too_many_connections"
)
_TIMEOUT = {
    kind: _raw_response(
        408, "Request Timeout", f"the request {kind} did not arrive in time", "request_timeout"
    )
    for kind in ("headers", "body")
}


class GuardedH11Protocol(H11Protocol):
    limits = TransportLimits()  # replaced per server by protocol_class()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over = len(self.connections) >= self.limits.max_connections
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind: str | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        _set_nodelay(transport)
        if over:
            log.warning("refused a connection: %d open", len(self.connections) - 1)
            transport.write(_REFUSED)
            transport.close()
            return
        self._update_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        self._cancel_write_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(
                self.limits.timeout_write_s, self._expire, "write"
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_deadline()

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _update_deadline(self) -> None:
        """Which deadline applies now: headers while a request is incomplete (and uvicorn's
        keep-alive timer is not running), body while it is being received, none otherwise."""
        if self.transport.is_closing():
            return self._set_deadline(None)
        state = self.conn.their_state
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            idle_between_requests = self.cycle is not None and self.cycle.response_complete
            kind = None if idle_between_requests and not self.conn.trailing_data[0] else "headers"
        elif state is h11.SEND_BODY:
            kind = "body"
        else:
            kind = None
        if kind != self._deadline_kind:
            self._set_deadline(kind)

    def _set_deadline(self, kind: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._deadline_kind = None, kind
        if kind is not None:
            delay = (
                self.limits.timeout_headers_s if kind == "headers" else self.limits.timeout_body_s
            )
            self._deadline = self.loop.call_later(delay, self._expire, kind)

    def _expire(self, kind: str) -> None:
        if self.transport.is_closing():
            return
        log.info("closing a connection from %s: %s timeout", self.client, kind)
        if kind in _TIMEOUT and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            cycle = self.cycle if kind == "body" else None
            if cycle is None or not cycle.response_started:
                if cycle is not None:
                    cycle.disconnected = True  # the handler's own answer goes nowhere
                self.transport.write(_TIMEOUT[kind])
        if kind == "write":
            self.transport.abort()  # close() would wait to flush to a client that reads nothing
        else:
            self.transport.close()


def _set_nodelay(transport: asyncio.Transport) -> None:
    # asyncio sets TCP_NODELAY only when the listening socket says proto=IPPROTO_TCP; one made
    # with proto 0 (a socket handed to uvicorn) would leave Nagle on: ~40 ms per response, as
    # uvicorn writes headers and body separately and the client delays its ACK
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def protocol_class(limits: TransportLimits) -> type[H11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def uvicorn_config(app: Any, limits: TransportLimits, **kwargs: Any) -> uvicorn.Config:
    kwargs.setdefault("timeout_graceful_shutdown", 5)  # then open streams are cancelled
    return uvicorn.Config(
        app,
        http=protocol_class(limits),
        timeout_keep_alive=limits.timeout_keep_alive_s,  # type: ignore[arg-type]
        lifespan="on",
        **kwargs,
    )


def run_server(app: Any, config: uvicorn.Config, sockets: list[socket.socket] | None = None) -> int:
    """Serve until a signal (exit status 0) or until the engine loop dies (status 1: the server
    stops taking requests, lets open streams end with an error event, and shuts down)."""
    server = uvicorn.Server(config)
    async_engine = app.state.qwen35.async_engine

    def engine_died() -> None:
        log.error("the engine loop died; shutting the server down (exit status 1)")
        server.should_exit = True

    async_engine.on_death.append(engine_died)
    server.run(sockets=sockets)
    if async_engine.error is not None:
        return 1
    return 0 if server.started else 1
