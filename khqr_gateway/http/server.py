"""Serving the app: request heads read in bounded time, idle keep-alive bounded, parse errors
answered as JSON without echoing or logging what the client sent."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong

from khqr_gateway.http.errors import error_response

log = logging.getLogger("khqr_gateway.http")

# Slowloris: a request's head (request line and headers, a few KB) must be complete this
# long after the connection opens or after the head's first byte; ample on any real link.
HEADER_READ_TIMEOUT_S = 10.0
# Idle keep-alive between requests. Longer than the 60 s idle timeout of common proxies
# and load balancers, so they stop reusing a connection before the gateway closes it.
KEEPALIVE_TIMEOUT_S = 75.0


class _Connection(web.RequestHandler):
    """aiohttp's HTTP/1.1 connection, with a deadline on each request head. aiohttp has
    none: its keep-alive timer is the only bound, and here it must stay long."""

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None
        self._heads_seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._heads_seen:  # the parser completed a head
            self._heads_seen = self._request_count
            self._disarm_head_deadline()
        elif data and self._head_deadline is None and self._between_requests():
            # Armed only for a head left incomplete: the usual chunk holds a whole one, and
            # a timer made and cancelled for it was a few percent of a small request.
            self._arm_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        # Bytes that come while a request is handled are its body (or the next request,
        # bounded by aiohttp's keep-alive timer once this one is answered).
        return not (self._request_in_progress or self._messages or self._upgraded)

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self._loop.call_later(self._header_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._request_count == self._heads_seen and self._between_requests():
            log.debug("no complete request head in %g s: connection closed", self._header_timeout)
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp cannot parse gets our JSON 400. aiohttp's own answer and log
        line quote the raw request line or header, which can hold a Bakong token (the compat
        route takes it in the query) or an API key: here neither echoes a byte of it."""
        if status != 400 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # Anything that is not HTTP on its first bytes (TLS, scanners) is internet noise.
        noise = self._request_count == 1 and isinstance(exc, BadHttpMethod)
        log.log(logging.DEBUG if noise else logging.INFO, "unparseable request: %s", _name(exc))
        response = error_response(400, "bad_request", self._unparseable(exc))
        response.force_close()
        return response

    def _unparseable(self, exc: BaseException | None) -> str:
        if isinstance(exc, LineTooLong):
            return f"the request line or a header is longer than {self.max_line_size} bytes"
        return "the request line or headers are not valid HTTP/1.1"


def _name(exc: BaseException | None) -> str:
    return type(exc).__name__ if exc is not None else "unknown"


class _Server(web.Server):
    """aiohttp's low-level server, making `_Connection`s."""

    header_timeout = HEADER_READ_TIMEOUT_S

    def __call__(self) -> web.RequestHandler:
        return _Connection(
            self, header_timeout=self.header_timeout, loop=self._loop, **self._kwargs
        )


class _Runner(web.AppRunner):
    """An AppRunner whose server makes `_Connection`s."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The Application builds its Server with no say in the protocol class; the
        # subclass only overrides __call__, so the built instance can take it on.
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.header_timeout = self._header_timeout
        return server


BACKLOG = 128


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on host:port (every address `host` names, as asyncio binds them);
    OSError when the port is taken. Binding comes before anything starts, so that a
    second process on one port stops before it runs a tick."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # Listening now holds the port: a peer that binds too cannot listen as well.
            sock.listen(BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    header_timeout: float = HEADER_READ_TIMEOUT_S,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
    sockets: list[socket.socket] | None = None,
) -> web.AppRunner:
    """Serve `app` on host:port as `khqr-gateway serve` does (on `sockets` when they were
    bound beforehand by `bind`); `runner.cleanup()` stops it."""
    sockets = sockets if sockets is not None else bind(host, port)
    runner = _Runner(
        app,
        header_timeout=header_timeout,
        keepalive_timeout=keepalive_timeout,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
    try:
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=BACKLOG).start()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return runner
