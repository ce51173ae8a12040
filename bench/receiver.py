"""Bench webhook receiver: a minimal HTTP/1.1 server that records when each webhook arrives.

Runs as its own process (`python bench/receiver.py --port N`). Kept to raw asyncio so that
on a 2-core machine it takes as little CPU from the gateway as possible.

- `POST <any path>`: a webhook; answered `200 ok`; its md5 and arrival time are recorded
  (except under `/sink`, which only answers: the bench measures the receiver's own rate there;
  under `/slow` the answer comes 0.2 s late, so that deliveries are in flight for a while);
- `GET /arrivals?since=I`: `{"next": J, "items": [[md5, epoch_s, status], ...]}` from index I;
- `GET /count`: `{"total": N}`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import parse_qs, urlsplit

import orjson
from procs import serve_main

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
MAX_HEAD = 64 * 1024
SLOW_S = 0.2

arrivals: list[tuple[str, float, str]] = []


def _reply(body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _record(body: bytes, now: float) -> None:
    try:
        value = orjson.loads(body)
        arrivals.append((str(value.get("md5", "")), now, str(value.get("status", ""))))
    except (orjson.JSONDecodeError, AttributeError):
        arrivals.append(("", now, "unparsed"))


def _control(target: str) -> bytes:
    parts = urlsplit(target)
    if parts.path == "/count":
        return _reply(orjson.dumps({"total": len(arrivals)}))
    since = int(parse_qs(parts.query).get("since", ["0"])[0])
    return _reply(orjson.dumps({"next": len(arrivals), "items": arrivals[since:]}))


class Http(asyncio.Protocol):
    """One keep-alive connection; requests are handled in order as they complete."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._one():
            pass

    def _one(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD and self.transport:
                self.transport.close()
            return False
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if len(self.buffer) < end + 4 + length:
            return False
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        assert self.transport is not None
        if method == "POST":
            if not target.startswith("/sink"):
                _record(body, time.time())
            if target.startswith("/slow"):
                # A receiver that takes a while: keeps deliveries in flight (recovery).
                asyncio.get_running_loop().call_later(SLOW_S, self._answer_late)
            else:
                self.transport.write(OK)
        else:
            self.transport.write(_control(target))
        if close:
            self.transport.close()
            return False
        return True

    def _answer_late(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(OK)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(Http, host, port, backlog=1024)
    print(f"bench receiver listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    serve_main(serve, __doc__)


if __name__ == "__main__":
    main()
