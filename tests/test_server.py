"""The gateway served as `khqr-gateway serve` serves it: bounded head reads and keep-alive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import asyncpg
import pytest

from khqr_gateway.app import create_app
from khqr_gateway.config import Settings
from khqr_gateway.server import serve_app
from tests.conftest import REDIS_URL

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
