"""The simulated Bakong as a developer meets it: mounted at /sandbox in sandbox mode (its own
error messages, a pay that pays what the gateway expects) and on its own."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from khqr_gateway.config import AppEnv, Settings
from khqr_gateway.http.app import create_app
from tests.conftest import REDIS_URL, Gateway, Receiver, SimulatedBakong, random_md5

MERCHANT = {"accountId": "shop@aclb", "merchantName": "Coffee Shop"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def sandboxed(
    settings: Settings, database_url: str, pg: asyncpg.Connection
) -> AsyncIterator[Gateway]:
    """The gateway as `make run` starts it: development, no Bakong configured, so the
    simulated Bakong is mounted at /sandbox and polled over HTTP on the gateway's port."""
    port = free_port()
    these = replace(
        settings,
        app_env=AppEnv.DEVELOPMENT,
        bakong_base_url=None,
        bakong_token=None,
        bakong_email=None,
        host="127.0.0.1",
        port=port,
    )
    assert these.sandbox
    app = create_app(these, database_url=database_url, redis_url=REDIS_URL)
    client = TestClient(TestServer(app, host="127.0.0.1", port=port))
    await client.start_server()
    yield Gateway(client, {})
    await client.close()


async def call(gw: Gateway, path: str, data: bytes | None = None, **headers: str) -> Any:
    resp = await gw.client.post(path, data=data, headers=headers)
    return resp.status, await resp.json()


async def test_mounted_sandbox_answers_its_own_error_messages(sandboxed: Gateway) -> None:
    status, body = await call(sandboxed, "/sandbox/control/transactions/not-an-md5/pay")
    assert status == 422
    assert body["error"]["message"] == "md5 must be 32 hex characters"
    assert body["error"]["details"] == [
        {"field": "md5", "message": "md5 must be 32 hex characters"}
    ]
    status, body = await call(
        sandboxed,
        "/sandbox/control/faults",
        b'{"delayS": -1}',
        **{"content-type": "application/json"},
    )
    assert status == 400
    assert body["error"]["message"] == "delayS must be a number of seconds (0-120)"
    status, body = await call(
        sandboxed,
        f"/sandbox/control/transactions/{random_md5()}/pay",
        b'{"amount": "lots"}',
        **{"content-type": "application/json"},
    )
    assert status == 422 and body["error"]["message"] == "amount must be a number"


async def test_standalone_sandbox_errors_have_the_same_shape(
    aiohttp_client: Any, bakong: SimulatedBakong
) -> None:
    client = await aiohttp_client(bakong.app)
    resp = await client.post("/control/transactions/xyz/fail")
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["message"] == "md5 must be 32 hex characters"


async def test_pay_with_a_body_that_is_not_json_is_400_and_pays_nothing(
    sandboxed: Gateway,
) -> None:
    md5 = random_md5()
    for body in (b"{amount: 5", b"[5]"):
        status, answer = await call(
            sandboxed,
            f"/sandbox/control/transactions/{md5}/pay",
            body,
            **{"content-type": "application/json"},
        )
        assert status == 400, answer
        assert answer["error"]["code"] == "bad_request"
    state = await (await sandboxed.client.get(f"/sandbox/control/transactions/{md5}")).json()
    assert state["status"] == "unpaid"


async def test_pay_with_no_body_pays_what_the_khqr_asked_for(
    sandboxed: Gateway, receiver: Receiver
) -> None:
    status, made = await sandboxed.post(
        "/api/v1/khqr",
        {"amount": "2500", "currency": "KHR", **MERCHANT, "webhookUrl": receiver.url},
    )
    assert status == 201, made
    status, paid = await call(sandboxed, f"/sandbox/control/transactions/{made['md5']}/pay")
    assert status == 200, paid
    assert (paid["data"]["amount"], paid["data"]["currency"]) == (2500, "KHR")
    assert paid["data"]["toAccountId"] == "shop@aclb"
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success", hook.json()


async def test_pay_with_no_body_pays_a_transactions_expectations_field_by_field(
    sandboxed: Gateway, receiver: Receiver
) -> None:
    md5 = random_md5()
    expected = {"amount": "7", "currency": "USD", "toAccountId": "cafe@aclb"}
    status, _ = await sandboxed.post(
        "/api/v1/transactions", {"md5": md5, "webhookUrl": receiver.url, "expected": expected}
    )
    assert status == 201
    status, paid = await call(
        sandboxed,
        f"/sandbox/control/transactions/{md5}/pay",
        b'{"amount": 6}',
        **{"content-type": "application/json"},
    )
    assert status == 200
    assert (paid["data"]["amount"], paid["data"]["toAccountId"]) == (6, "cafe@aclb")
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "mismatch", "what the body gives is paid as given"
    # An md5 the gateway does not track is paid as before: 1 USD to the sandbox merchant.
    status, other = await call(sandboxed, f"/sandbox/control/transactions/{random_md5()}/pay")
    assert status == 200
    assert (other["data"]["amount"], other["data"]["currency"]) == (1, "USD")


async def test_the_sandboxs_own_requests_are_logged_at_debug(
    sandboxed: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="khqr_gateway.http")
    await sandboxed.client.get("/sandbox/control/stats")
    await sandboxed.client.get("/api/v1/transactions")
    lines = {r.path: r.levelno for r in caplog.records if r.getMessage() == "request"}  # type: ignore[attr-defined]
    assert lines["/sandbox/control/stats"] == logging.DEBUG
    assert lines["/api/v1/transactions"] == logging.INFO


async def test_the_sandbox_has_a_bot_api_whose_inbox_shows_what_was_sent(
    sandboxed: Gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import secret

    caplog.set_level(logging.DEBUG, logger="khqr_gateway.http")
    # The test server's aiohttp access log prints raw paths; `serve` runs without it
    # (server.py, access_log=None), and the gateway's own request log is what is checked.
    monkeypatch.setattr(logging.getLogger("aiohttp.access"), "disabled", True)
    token = secret("7000001:sandbox-bot-token-" + "x" * 12)
    send = f"/sandbox/telegram/bot{token}/sendMessage"
    resp = await sandboxed.client.post(send, json={"chat_id": "-100", "text": "✅ 1.00 USD"})
    assert resp.status == 200
    sent = await resp.json()
    assert sent["ok"] and sent["result"]["text"] == "✅ 1.00 USD"
    inbox = await (await sandboxed.client.get("/sandbox/telegram/inbox/-100")).json()
    assert [m["text"] for m in inbox] == ["✅ 1.00 USD"]
    assert token not in str(inbox)
    bad = await sandboxed.client.post(send, json={"chat_id": "-100", "text": ""})
    assert bad.status == 400 and (await bad.json())["ok"] is False
    await sandboxed.client.post("/sandbox/telegram/control/block/-100")
    blocked = await sandboxed.client.post(send, json={"chat_id": "-100", "text": "again"})
    assert blocked.status == 403
    assert "blocked" in (await blocked.json())["description"]
    paths = [r.path for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert "/sandbox/telegram/bot<token>/sendMessage" in paths, paths
