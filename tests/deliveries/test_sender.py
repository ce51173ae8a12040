"""Webhook delivery against a real receiver: retries, give-up, attempts stored, fairness."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import itertools
import time
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks import WebhookVerificationError as StandardVerificationError

from khqr_gateway.deliveries.model import AttemptRecord, DeliveryStatus
from khqr_gateway.deliveries.store import record_attempts
from khqr_gateway.infra.db import write_isolated
from khqr_gateway.webhooks import verify
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5


async def paid(gw: Gateway, bakong: SimulatedBakong, url: str) -> dict[str, Any]:
    status, created = await gw.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": url}
    )
    assert status == 201, created
    bakong.pay(created["md5"])
    return created


async def attempts(pg: asyncpg.Connection, job_id: str) -> list[asyncpg.Record]:
    return await pg.fetch(
        """
        select a.* from delivery_attempts a join deliveries d on d.id = a.delivery_id
        where d.transaction_id = $1 order by a.attempt
        """,
        job_id,
    )


async def wait_attempts(
    pg: asyncpg.Connection, job_id: str, count: int = 1, timeout: float = 5
) -> list[asyncpg.Record]:
    """The stored attempts of a transaction's delivery, once there are `count` (or the timeout)."""
    deadline = time.monotonic() + timeout
    rows = await attempts(pg, job_id)
    while time.monotonic() < deadline and len(rows) < count:
        await asyncio.sleep(0.1)
        rows = await attempts(pg, job_id)
    return rows


async def hook_url(aiohttp_server: Any, handler: Any, **server_options: Any) -> str:
    """A receiver of our own answering POST /hook with `handler`."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    server = await aiohttp_server(app, **server_options)
    return str(server.make_url("/hook"))


async def test_500_500_200_makes_three_attempts_with_one_webhook_id(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    receiver.statuses = [500, 500, 200]
    created = await paid(gateway, bakong, receiver.url)
    hooks = await receiver.wait_for(3)
    assert len({h.headers["webhook-id"] for h in hooks}) == 1
    assert len({h.body for h in hooks}) == 1, "every retry sends the same bytes"
    gaps = [b.at - a.at for a, b in itertools.pairwise(hooks)]
    assert gaps[0] >= 0.15 and gaps[1] > gaps[0] * 0.9, gaps  # schedule 0.2 s, 0.4 s (+-20%)
    done = await gateway.wait_status(created["jobId"], "success")
    await asyncio.sleep(0.2)
    rows = await attempts(pg, created["jobId"])
    assert [r["status_code"] for r in rows] == [500, 500, 200]
    assert [r["attempt"] for r in rows] == [1, 2, 3]
    _, body = await gateway.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["delivery"]["status"] == "delivered"
    assert body["delivery"]["attempts"] == 3
    assert done["jobId"] == created["jobId"]


async def test_gives_up_after_the_schedule_and_keeps_the_delivery(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    receiver.statuses = [503] * 10
    created = await paid(gateway, bakong, receiver.url)
    await receiver.wait_for(4)  # 1 + 3 retries of the test schedule
    await asyncio.sleep(1.0)
    assert len(receiver.received) == 4
    status = await pg.fetchval(
        "select status from deliveries where transaction_id = $1", created["jobId"]
    )
    assert status == "failed"


async def test_410_stops_at_once(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    receiver.statuses = [410]
    created = await paid(gateway, bakong, receiver.url)
    await receiver.wait_for(1)
    await asyncio.sleep(0.6)
    assert len(receiver.received) == 1
    assert (
        await pg.fetchval(
            "select status from deliveries where transaction_id = $1", created["jobId"]
        )
        == "failed"
    )


async def test_redirect_is_not_followed(
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    aiohttp_server: Any,
    pg: asyncpg.Connection,
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(receiver.url)

    created = await paid(gateway, bakong, await hook_url(aiohttp_server, redirect))
    await asyncio.sleep(1.5)
    assert receiver.received == [], "the redirect target never got the webhook"
    rows = await attempts(pg, created["jobId"])
    assert rows and all(r["status_code"] == 302 for r in rows)


async def test_timeout_is_recorded_as_an_attempt(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    gw = await make_gateway(webhook_timeout_s=0.3)
    receiver.delay_s = 1.0
    created = await paid(gw, bakong, receiver.url)
    await receiver.wait_for(1)
    rows = await wait_attempts(pg, created["jobId"])
    assert rows[0]["error_kind"] == "timeout"
    assert rows[0]["status_code"] is None


async def test_refused_connection_is_recorded_and_retried(
    gateway: Gateway, bakong: SimulatedBakong, pg: asyncpg.Connection, unused_tcp_port: int
) -> None:
    created = await paid(gateway, bakong, f"http://127.0.0.1:{unused_tcp_port}/hook")
    rows = await wait_attempts(pg, created["jobId"], count=2)
    assert len(rows) >= 2
    assert rows[0]["error_kind"] == "connect"


async def test_large_response_body_is_cut_to_4kb(
    gateway: Gateway, bakong: SimulatedBakong, aiohttp_server: Any, pg: asyncpg.Connection
) -> None:
    async def chatty(request: web.Request) -> web.Response:
        return web.Response(text="x" * 100_000)

    created = await paid(gateway, bakong, await hook_url(aiohttp_server, chatty))
    await gateway.wait_status(created["jobId"], "success")
    [row] = await wait_attempts(pg, created["jobId"])
    assert row["status_code"] == 200
    assert len(row["response_body"]) == 4096


async def test_a_hanging_receiver_does_not_delay_a_healthy_one(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver, aiohttp_server: Any
) -> None:
    gw = await make_gateway(webhook_timeout_s=3.0)

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3.5)
        return web.Response()

    slow = await hook_url(aiohttp_server, hang)
    for _ in range(40):
        await paid(gw, bakong, slow)
    await asyncio.sleep(0.5)
    start = time.time()
    await paid(gw, bakong, receiver.url)
    [hook] = await receiver.wait_for(1, timeout=2.5)
    assert hook.at - start < 1.5


# Signatures on the real request, and replays


SECRET_KEY = bytes(range(7, 39))
OLD_SECRET_KEY = bytes(range(50, 82))


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


async def test_sent_webhook_verifies_with_standardwebhooks_and_plain_hmac(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    gw = await make_gateway(webhook_secrets=(SECRET_KEY, OLD_SECRET_KEY))
    created = await paid(gw, bakong, receiver.url)
    [hook] = await receiver.wait_for(1)
    # Either secret verifies: receivers keep working while the secret is rotated.
    for key in (SECRET_KEY, OLD_SECRET_KEY):
        body = Webhook(whsec(key)).verify(hook.body, hook.headers)
        assert body["jobId"] == created["jobId"] and body["status"] == "success"
        assert verify(whsec(key), hook.headers, hook.body)["md5"] == created["md5"]
    simple = hook.headers["x-webhook-signature"].split(", ")
    assert "sha256=" + hmac.new(SECRET_KEY, hook.body, hashlib.sha256).hexdigest() in simple
    assert hook.headers["Content-Type"] == "application/json"
    with pytest.raises(StandardVerificationError):
        Webhook(whsec(bytes(32))).verify(hook.body, hook.headers)
    with pytest.raises(StandardVerificationError):
        Webhook(whsec(SECRET_KEY)).verify(hook.body.replace(b"success", b"failed!"), hook.headers)


async def delivery_of(gw: Gateway, job_id: str) -> dict[str, Any]:
    """The delivery of a transaction with its attempts, as the API reports it ({} if none)."""
    _, page = await gw.get(f"/api/v1/deliveries?jobId={job_id}")
    if not page["data"]:
        return {}
    _, delivery = await gw.get(f"/api/v1/deliveries/{page['data'][0]['id']}")
    return delivery


async def wait_delivery(
    gw: Gateway, job_id: str, status: str, attempts: int, timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delivery: dict[str, Any] = {}
    while time.monotonic() < deadline:
        delivery = await delivery_of(gw, job_id)
        if delivery.get("status") == status and len(delivery["attempts"]) == attempts:
            return delivery
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery never {status} after {attempts} attempts: {delivery}")


async def test_manual_retry_sends_again_with_the_same_webhook_id(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    gw = await make_gateway(webhook_secrets=(SECRET_KEY,))
    receiver.statuses = [410]
    created = await paid(gw, bakong, receiver.url)
    failed = await wait_delivery(gw, created["jobId"], "failed", 1)
    receiver.statuses = [500, 200]  # the new series has the whole retry schedule again
    status, queued = await gw.post(f"/api/v1/deliveries/{failed['id']}/retry", None)
    assert status == 202, queued
    assert queued["id"] == failed["id"] and queued["status"] == "pending"
    hooks = await receiver.wait_for(3)
    done = await wait_delivery(gw, created["jobId"], "delivered", 3)
    assert {h.headers["webhook-id"] for h in hooks} == {failed["id"]}
    assert len({h.body for h in hooks}) == 1
    assert int(hooks[2].headers["webhook-timestamp"]) >= int(hooks[0].headers["webhook-timestamp"])
    for hook in hooks:  # each attempt is signed anew, and verifies
        Webhook(whsec(SECRET_KEY)).verify(hook.body, hook.headers)
    assert [a["statusCode"] for a in done["attempts"]] == [410, 500, 200]
    assert [a["attempt"] for a in done["attempts"]] == [1, 2, 3]
    assert done["attemptCount"] == 3 and done["deliveredAt"] is not None


async def test_manual_retry_replays_a_delivered_webhook(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await paid(gateway, bakong, receiver.url)
    first = await wait_delivery(gateway, created["jobId"], "delivered", 1)
    status, _ = await gateway.post(f"/api/v1/deliveries/{first['id']}/retry", None)
    assert status == 202
    hooks = await receiver.wait_for(2)
    assert hooks[0].headers["webhook-id"] == hooks[1].headers["webhook-id"] == first["id"]
    assert hooks[0].body == hooks[1].body
    replayed = await wait_delivery(gateway, created["jobId"], "delivered", 2)
    assert replayed["deliveredAt"] >= first["deliveredAt"]


async def test_a_retry_while_an_attempt_is_in_flight_never_sends_twice_at_once(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    receiver.delay_s = 1.0  # the receiver holds the first attempt open
    created = await paid(gateway, bakong, receiver.url)
    await receiver.wait_for(1)
    delivery = await delivery_of(gateway, created["jobId"])
    status, body = await gateway.post(f"/api/v1/deliveries/{delivery['id']}/retry", None)
    await asyncio.sleep(0.5)  # the first attempt is still held open
    assert len(receiver.received) == 1, "a second send while the first was in flight"
    assert status == 409, body
    assert body["error"]["code"] == "delivery_in_flight"
    assert body["error"]["details"] == {"id": delivery["id"]}
    await wait_delivery(gateway, created["jobId"], "delivered", 1)

    receiver.delay_s = 0.0
    status, body = await gateway.post(f"/api/v1/deliveries/{delivery['id']}/retry", None)
    assert status == 202, body
    done = await wait_delivery(gateway, created["jobId"], "delivered", 2)
    assert [a["attempt"] for a in done["attempts"]] == [1, 2]
    assert done["attemptCount"] == 2
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 2
    assert receiver.received[1].at >= receiver.received[0].at + 1.0, "one send at a time"


async def test_manual_retry_of_an_unknown_delivery_is_404(gateway: Gateway) -> None:
    status, body = await gateway.post("/api/v1/deliveries/msg_nope/retry", None)
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_bulk_retry_sends_the_failed_ones_again(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    receiver.statuses = [410, 410, 410]
    failed = [await paid(gateway, bakong, receiver.url) for _ in range(3)]
    ids = {(await wait_delivery(gateway, c["jobId"], "failed", 1))["id"] for c in failed}
    ok = await paid(gateway, bakong, receiver.url)
    delivered = await wait_delivery(gateway, ok["jobId"], "delivered", 1)

    status, body = await gateway.post("/api/v1/deliveries/retry", {"limit": 2})
    assert status == 202, body
    assert body["retried"] == 2 and body["hasMore"] is True
    assert set(body["ids"]) < ids
    status, rest = await gateway.post("/api/v1/deliveries/retry", {"status": "failed"})
    assert (rest["retried"], rest["hasMore"]) == (1, False)
    assert set(body["ids"]) | set(rest["ids"]) == ids

    hooks = await receiver.wait_for(7)  # 3 failed + 1 delivered + 3 replays
    await asyncio.sleep(0.3)
    replays = [h.headers["webhook-id"] for h in hooks[4:]]
    assert len(hooks) == 7 and sorted(replays) == sorted(ids)
    assert delivered["id"] not in replays, "only failed deliveries were retried"
    for created in failed:
        await wait_delivery(gateway, created["jobId"], "delivered", 2)


async def test_bulk_retry_filters_by_time_and_checks_its_body(gateway: Gateway) -> None:
    status, body = await gateway.post("/api/v1/deliveries/retry", {"since": "2999-01-01T00:00Z"})
    assert (status, body["retried"], body["ids"]) == (202, 0, [])
    resp = await gateway.client.post("/api/v1/deliveries/retry", headers=gateway.headers)
    assert resp.status == 202, "no body means: every failed delivery"
    for bad in (
        {"limit": 1001},
        {"limit": 0},
        {"status": "lost"},
        {"since": "yesterday"},
        {"since": "2024-02-01T00:00:00Z", "until": "2024-01-01T00:00:00Z"},
        {"olderThan": 5},
    ):
        status, body = await gateway.post("/api/v1/deliveries/retry", bad)
        assert status == 422, (bad, body)
        assert body["error"]["code"] == "validation_error"


async def test_a_1_gb_response_is_never_read_past_4_kb(
    gateway: Gateway, bakong: SimulatedBakong, aiohttp_server: Any, pg: asyncpg.Connection
) -> None:
    sent = {"bytes": 0}

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(1 << 30)})
        await resp.prepare(request)
        chunk = b"x" * 65536
        try:
            while sent["bytes"] < 1 << 30:
                await resp.write(chunk)
                sent["bytes"] += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    created = await paid(gateway, bakong, await hook_url(aiohttp_server, endless))
    await gateway.wait_status(created["jobId"], "success")
    [row] = await wait_attempts(pg, created["jobId"])
    assert row["status_code"] == 200 and len(row["response_body"]) == 4096
    await asyncio.sleep(0.3)
    # The connection was dropped after 4 KB: the receiver got nowhere near 1 GB out.
    assert sent["bytes"] < 64 << 20, sent


async def test_invalid_tls_is_recorded_as_tls(
    gateway: Gateway,
    bakong: SimulatedBakong,
    aiohttp_server: Any,
    pg: asyncpg.Connection,
    tmp_path: Any,
) -> None:
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    url = await hook_url(aiohttp_server, ok, ssl=context)
    created = await paid(gateway, bakong, url.replace("http://", "https://"))
    rows = await wait_attempts(pg, created["jobId"])
    assert rows[0]["error_kind"] == "tls", rows[0]["error_message"]
    assert rows[0]["status_code"] is None


async def test_a_gzip_answer_is_one_delivered_attempt_and_spares_its_batch(
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    aiohttp_server: Any,
    pg: asyncpg.Connection,
) -> None:
    """A receiver behind nginx or Cloudflare compresses its 2xx (byte 4 of any gzip body is
    a NUL): one attempt, delivered and stored, and the deliveries sharing its batch go out
    once each."""
    seen: list[str] = []

    async def compressed(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        # Compressed whatever was asked for, as a misconfigured proxy does.
        body = gzip.compress(b'{"ok":true}')
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    hostile = await paid(gateway, bakong, await hook_url(aiohttp_server, compressed))
    ordinary = [await paid(gateway, bakong, receiver.url) for _ in range(20)]
    await receiver.wait_for(20)
    await gateway.wait_status(hostile["jobId"], "success")
    rows = await wait_attempts(pg, hostile["jobId"])
    assert len(rows) == 1, f"{len(rows)} attempts stored"
    [row] = rows
    # Long enough for the old code's give-back (2 s) to have sent everything again.
    await asyncio.sleep(3)
    assert len(seen) == 1, f"the compressing receiver was sent {len(seen)} times"
    assert seen == ["identity"]
    assert len(receiver.received) == 20
    assert row["status_code"] == 200 and "\x00" not in row["response_body"]
    assert "\ufffd" in row["response_body"]
    delivered = await pg.fetch(
        "select d.status, d.attempt_count from deliveries d join transactions t"
        " on t.id = d.transaction_id where t.id = any($1::uuid[])",
        [c["jobId"] for c in [hostile, *ordinary]],
    )
    assert [(r["status"], r["attempt_count"]) for r in delivered] == [("delivered", 1)] * 21


async def raw_receiver(answer: bytes) -> tuple[str, asyncio.Server]:
    """A receiver that answers every request with exactly these bytes, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}/hook", server


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/\x01plain\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\x00\r\n",
        b"HTTP/1.1 5\x00\xff Bad\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\n",
    ],
    ids=["control-in-header", "nul-in-header", "nul-in-status-line", "nul-in-body"],
)
async def test_any_bytes_a_receiver_answers_are_stored_and_the_schedule_holds(
    gateway: Gateway, bakong: SimulatedBakong, pg: asyncpg.Connection, head: bytes
) -> None:
    """NUL and invalid UTF-8 in the body, the headers or the status line: every attempt
    stored, retried on the schedule (3 retries in the tests), then failed."""
    body = b"\x00\xff\xfe down \xc3( \x00"
    answer = head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    url, server = await raw_receiver(answer)
    async with server:
        created = await paid(gateway, bakong, url)
        rows = await wait_attempts(pg, created["jobId"], count=4, timeout=8)
        await asyncio.sleep(1)
    assert [r["attempt"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        stored = " ".join(str(row[k]) for k in ("response_body", "error_message"))
        assert "\x00" not in stored and (row["status_code"] == 503 or row["error_kind"])
    delivery = await pg.fetchrow(
        "select status, attempt_count from deliveries where transaction_id = $1",
        created["jobId"],
    )
    assert (delivery["status"], delivery["attempt_count"]) == ("failed", 4)


async def test_an_attempt_postgres_refuses_fails_only_itself(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    """One row of a group commit that Postgres refuses (here: its delivery is gone) never
    costs the others their stored attempt."""
    created = await paid(gateway, bakong, receiver.url)
    await receiver.wait_for(1)
    [first] = await wait_attempts(pg, created["jobId"])
    good = AttemptRecord(
        delivery_id=first["delivery_id"],
        attempt=2,
        started_at=datetime.now(UTC),
        duration_ms=3,
        status_code=200,
        error_kind=None,
        error_message=None,
        response_body="ok",
        response_headers=None,
        new_status=DeliveryStatus.DELIVERED,
        next_attempt_at=None,
    )
    orphan = replace(good, delivery_id="msg_gone")
    write = partial(record_attempts, gateway.service.pool)
    stored, refused = await write_isolated(write, [orphan, good, orphan])
    assert stored == [good.delivery_id]
    assert [row for row, _ in refused] == [orphan, orphan]
    assert [r["attempt"] for r in await attempts(pg, created["jobId"])] == [1, 2]
