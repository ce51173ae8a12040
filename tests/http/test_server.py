"""The gateway served as `khqr-gateway serve` serves it: bounded head reads and keep-alive,
and requests aiohttp cannot parse answered as JSON without echoing or logging them."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest

from khqr_gateway.config import Settings
from khqr_gateway.http.app import create_app
from khqr_gateway.http.server import serve_app
from tests.conftest import REDIS_URL, random_md5, secret

Serve = Callable[..., Awaitable[int]]
# Generous: each test's own timeout is 1-2 s; the bound only has to tell "closed" from "never".
CLOSED_WITHIN_S = 8.0


@pytest.fixture
async def serve(
    settings: Settings, database_url: str, pg: asyncpg.Connection
) -> AsyncIterator[Serve]:
    """Start the app through the production serving path; returns its port."""
    runners = []

    async def start(**knobs: float) -> int:
        app = create_app(
            replace(settings, api_keys=()),
            database_url=database_url,
            redis_url=REDIS_URL,
            run_ticks=False,
        )
        runner = await serve_app(app, "127.0.0.1", 0, shutdown_timeout=2, **knobs)
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection within `seconds`, reading what it sends."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not await asyncio.wait_for(reader.read(4096), left):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; read one response (status, lower-cased headers, body)."""
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, body


HEALTH = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def test_a_request_head_trickled_byte_by_byte_is_cut_off(serve: Serve) -> None:
    port = await serve(header_timeout=1.5, keepalive_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 1000

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.5)

    sending = asyncio.create_task(trickle())
    try:
        assert await closed_within(reader, CLOSED_WITHIN_S), "a slowloris head kept it open"
    finally:
        sending.cancel()
        writer.close()


async def test_500_slowloris_connections_are_cut_off_and_the_api_still_answers(
    serve: Serve,
) -> None:
    port = await serve(header_timeout=2, keepalive_timeout=60)
    started = time.monotonic()

    async def slowloris() -> float | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened = time.monotonic()

        async def trickle() -> None:
            for byte in b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.5)

        sending = asyncio.create_task(trickle())
        try:
            closed = await closed_within(reader, CLOSED_WITHIN_S)
            return time.monotonic() - opened if closed else None
        finally:
            sending.cancel()
            writer.close()

    attack = [asyncio.create_task(slowloris()) for _ in range(500)]
    await asyncio.sleep(1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, _, _ = await exchange(reader, writer, HEALTH)
    finally:
        writer.close()
    assert status == 200, "the API answers while 500 heads trickle in"
    held = await asyncio.gather(*attack)
    assert None not in held, f"{held.count(None)} of 500 slowloris connections stayed open"
    closed = [t for t in held if t is not None]
    print(
        f"500 slowloris connections: closed {min(closed):.1f}-{max(closed):.1f} s after opening"
        f" (deadline 2 s), all within {time.monotonic() - started:.1f} s; /health 200 meanwhile"
    )


async def test_a_connection_that_sends_nothing_is_closed(serve: Serve) -> None:
    port = await serve(header_timeout=1, keepalive_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await closed_within(reader, CLOSED_WITHIN_S)
    finally:
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed(serve: Serve) -> None:
    port = await serve(header_timeout=60, keepalive_timeout=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, _, _ = await exchange(reader, writer, HEALTH)
        assert status == 200
        assert await closed_within(reader, CLOSED_WITHIN_S), "idle keep-alive kept it open"
    finally:
        writer.close()


async def test_a_slow_head_in_time_and_a_reused_connection_are_served(serve: Serve) -> None:
    port = await serve(header_timeout=2, keepalive_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in (b"GET /hea", b"lth HTTP/1.1\r\nHo", b"st: gateway\r\n"):
            writer.write(part)
            await asyncio.sleep(0.2)
        status, _, _ = await exchange(reader, writer, b"\r\n")
        assert status == 200
        # Idle longer than the head deadline but within keep-alive: the connection is kept.
        await asyncio.sleep(2.5)
        status, _, _ = await exchange(reader, writer, HEALTH)
        assert status == 200
    finally:
        writer.close()


def _malformed(token: str, api_key: str) -> dict[str, bytes]:
    md5 = random_md5()
    return {
        "tab in the request line": (
            f"GET /api/v1/transaction/{md5}/md5?token={token}\t HTTP/1.1\r\nHost: gateway\r\n\r\n"
        ).encode(),
        "control byte in the method": f"G\x01T /x?token={token} HTTP/1.1\r\n\r\n".encode(),
        "space in a header name": (
            f"GET /health HTTP/1.1\r\nHost: gateway\r\nBad Authorization: Bearer {api_key}\r\n\r\n"
        ).encode(),
        "line too long": (
            f"GET /api/v1/transaction/{md5}/md5?token={token}&pad={'a' * 9000} HTTP/1.1\r\n\r\n"
        ).encode(),
    }


@pytest.mark.parametrize(
    "case",
    [
        "tab in the request line",
        "control byte in the method",
        "space in a header name",
        "line too long",
    ],
)
async def test_an_unparseable_request_is_a_json_400_that_echoes_nothing(
    serve: Serve, case: str
) -> None:
    token = secret("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9." + secrets.token_hex(12))
    api_key = secret("api-key-" + secrets.token_hex(12))
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, headers, body = await exchange(reader, writer, _malformed(token, api_key)[case])
    finally:
        writer.close()
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    answer: Any = orjson.loads(body)
    assert answer["error"]["code"] == "bad_request"
    assert set(answer["error"]) == {"code", "message", "details"}
    assert token not in body.decode() and api_key not in body.decode()
    # The autouse fixture fails the test if a log line holds the token or the key.
