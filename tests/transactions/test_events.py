"""Live status: Redis pub/sub between processes, and the SSE stream of a transaction."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from khqr_gateway.config import Settings
from khqr_gateway.http.app import create_app
from khqr_gateway.http.server import serve_app
from khqr_gateway.infra.keys import keys
from khqr_gateway.service import SERVICE_KEY
from khqr_gateway.transactions.events import Change, EventHub
from khqr_gateway.transactions.model import Status
from tests.conftest import REDIS_URL, Gateway, GatewayFactory, Receiver, SimulatedBakong
from tests.http.test_pay import checkout
from tests.http.test_transactions import create
from tests.sse import Reader


async def events(gw: Gateway, job_id: str, **headers: str) -> Reader:
    resp = await gw.client.get(
        f"/api/v1/transactions/{job_id}/events", headers={**gw.headers, **headers}
    )
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    return Reader(resp)


async def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.02)


async def test_a_change_published_by_one_hub_reaches_the_other(
    redis: Redis, namespace: str
) -> None:
    channel = keys(namespace)["events"]
    mine, theirs = EventHub(redis, channel), EventHub(redis, channel)
    job_id = uuid.uuid4()
    try:
        async with mine.subscribe(job_id) as sub:
            # Published the moment subscribe() returns: the subscription is already live.
            await theirs.publish(
                [Change(job_id, Status.SUCCESS), Change(uuid.uuid4(), Status.FAILED)]
            )
            change = await sub.get(2.0)
            assert change == Change(job_id, Status.SUCCESS)
            assert await sub.get(0.2) is None, "only this transaction's changes"
        assert mine.open_streams == 0
    finally:
        await mine.stop()
        await theirs.stop()


async def test_stream_sees_a_payment_found_by_another_process(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    watcher = await make_gateway(run_ticks=False)  # never polls: only pub/sub can tell it
    await make_gateway()
    created = await create(watcher, receiver)
    stream = await events(watcher, created["jobId"])
    first = await stream.next()
    assert first is not None
    assert first.id == "pending"
    assert first.json() == {"jobId": created["jobId"], "status": "pending", "reason": None}

    bakong.pay(created["md5"])
    rest = await stream.rest(timeout=5)  # well inside the 15 s heartbeat re-read
    assert [(e.id, e.json()["status"]) for e in rest] == [("success", "success")]
    assert stream.ended


async def test_cancel_on_another_process_ends_the_stream(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    watcher = await make_gateway(run_ticks=False)
    other = await make_gateway(run_ticks=False)
    created = await create(watcher, receiver)
    stream = await events(watcher, created["jobId"])
    assert (await stream.next()) is not None
    resp = await other.client.delete(f"/api/v1/transactions/{created['jobId']}")
    assert resp.status == 200
    rest = await stream.rest()
    assert [e.json() for e in rest] == [
        {"jobId": created["jobId"], "status": "cancelled", "reason": "cancelled_by_request"}
    ]


async def test_a_final_transaction_gives_one_event_and_a_reconnect_gets_204(
    gateway: Gateway, receiver: Receiver
) -> None:
    created = await create(gateway, receiver)
    await gateway.client.delete(f"/api/v1/transactions/{created['jobId']}")
    stream = await events(gateway, created["jobId"])
    assert [e.id for e in await stream.rest()] == ["cancelled"]
    # An EventSource reconnects after the server closes; 204 is what makes it stop.
    again = await gateway.client.get(
        f"/api/v1/transactions/{created['jobId']}/events", headers={"Last-Event-ID": "cancelled"}
    )
    assert again.status == 204


async def test_unknown_transaction_is_404(gateway: Gateway) -> None:
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        resp = await gateway.client.get(f"/api/v1/transactions/{job_id}/events")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
        head = await gateway.client.head(f"/api/v1/transactions/{job_id}/events")
        assert head.status == 404
    assert gateway.service.events.open_streams == 0


async def test_events_need_the_api_key(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_keys=("k" * 32,))
    resp = await gw.client.get(f"/api/v1/transactions/{uuid.uuid4()}/events")
    assert resp.status == 401


async def test_heartbeats_keep_the_stream_alive_and_reread_postgres(
    gateway: Gateway, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    gateway.service.events.heartbeat_s = 0.2
    created = await create(gateway, receiver)
    stream = await events(gateway, created["jobId"])
    assert (await stream.next()) is not None
    await asyncio.sleep(0.5)
    # A change that was never published (say Redis was away): the next heartbeat finds it.
    await pg.execute(
        "update transactions set status = 'failed', reason = 'x' where id = $1", created["jobId"]
    )
    rest = await stream.rest(timeout=3)
    assert stream.comments, "comment heartbeats were sent while pending"
    assert [e.json()["status"] for e in rest] == ["failed"]


async def test_open_streams_are_bounded(gateway: Gateway, receiver: Receiver) -> None:
    gateway.service.events.max_streams = 2
    created = await create(gateway, receiver)
    open_ = [await events(gateway, created["jobId"]) for _ in range(2)]
    for stream in open_:
        assert (await stream.next()) is not None
    refused = await gateway.client.get(f"/api/v1/transactions/{created['jobId']}/events")
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    assert (await refused.json())["error"]["code"] == "too_many_streams"


async def _serve(settings: Settings, database_url: str) -> tuple[web.AppRunner, str]:
    """The app on a real socket, run as `khqr-gateway serve` runs it (no handler cancellation)."""
    app = create_app(settings, database_url=database_url, redis_url=REDIS_URL, run_ticks=False)
    runner = await serve_app(app, "127.0.0.1", 0, shutdown_timeout=30)
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def test_disconnects_free_streams_and_tasks(
    settings: Settings, database_url: str, pg: asyncpg.Connection, receiver: Receiver
) -> None:
    runner, url = await _serve(replace(settings, api_keys=()), database_url)
    hub = runner.app[SERVICE_KEY].events
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/api/v1/transactions",
                json={"md5": uuid.uuid4().hex, "webhookUrl": receiver.url},
            ) as resp:
                job_id = (await resp.json())["jobId"]
            path = f"{url}/api/v1/transactions/{job_id}/events"

            async def open_stream() -> aiohttp.ClientResponse:
                resp = await session.get(path)
                assert (await Reader(resp).next()) is not None
                return resp

            (await open_stream()).close()  # the first stream also starts the shared listener
            await wait_until(lambda: hub.open_streams == 0)
            await asyncio.sleep(0.1)
            baseline = len(asyncio.all_tasks())

            streams = [await open_stream() for _ in range(5)]
            assert hub.open_streams == 5
            for resp in streams:
                resp.close()
            await wait_until(lambda: hub.open_streams == 0, timeout=3)
            await wait_until(lambda: len(asyncio.all_tasks()) <= baseline, timeout=3)
    finally:
        await runner.cleanup()


async def test_shutdown_ends_open_streams_at_once(
    settings: Settings, database_url: str, pg: asyncpg.Connection, receiver: Receiver
) -> None:
    runner, url = await _serve(replace(settings, api_keys=()), database_url)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/api/v1/transactions",
            json={"md5": uuid.uuid4().hex, "webhookUrl": receiver.url},
        ) as resp:
            job_id = (await resp.json())["jobId"]
        stream = Reader(await session.get(f"{url}/api/v1/transactions/{job_id}/events"))
        assert (await stream.next()) is not None
        started = time.monotonic()
        await runner.cleanup()  # would wait out shutdown_timeout (30 s) for a stuck stream
        assert time.monotonic() - started < 5
        assert await stream.next() is None


async def _raw_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """One response's status line and headers, read off a raw socket."""
    status = (await reader.readline()).rstrip(b"\r\n")
    headers: dict[str, str] = {}
    while line := (await reader.readline()).decode("latin-1").rstrip("\r\n"):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return status, headers


@pytest.mark.parametrize("kind", ["events", "track", "page"])
async def test_head_on_a_stream_answers_headers_only_and_keeps_the_connection_clean(
    gateway: Gateway, receiver: Receiver, kind: str
) -> None:
    if kind == "page":
        made = await checkout(gateway, receiver)
        path = f"{made['path']}/events?t={made['token']}"
    else:
        job_id = (await create(gateway, receiver))["jobId"]
        path = {
            "events": f"/api/v1/transactions/{job_id}/events",
            "track": f"/api/v1/transaction/{job_id}/track",
        }[kind]
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        # Both requests at once on one keep-alive connection, as a proxy's pool reuses it.
        writer.write(
            f"HEAD {path} HTTP/1.1\r\nHost: gw\r\n\r\n"
            "GET /health HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            status, headers = await _raw_response(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert headers["content-type"] == "text/event-stream"
            status, headers = await _raw_response(reader)
            assert status == b"HTTP/1.1 200 OK", "the HEAD answer had a body"
            body = await reader.readexactly(int(headers["content-length"]))
        assert orjson.loads(body)["status"] == "ok"
    finally:
        writer.close()
    assert gateway.service.events.open_streams == 0, "HEAD holds no stream"
