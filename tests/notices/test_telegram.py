"""Telegram notices against a fake Bot API on a real socket: one message per payment."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from khqr_gateway.bakong import khqr
from khqr_gateway.notices.model import DueNotice
from khqr_gateway.notices.telegram import message_text
from khqr_gateway.transactions.model import Status
from tests.conftest import (
    Gateway,
    GatewayFactory,
    Receiver,
    SimulatedBakong,
    assert_no_secret,
    random_md5,
    secret,
)


@dataclass
class FakeBotApi:
    """Telegram's Bot API as far as sendMessage goes: records each call, answers as told."""

    url: str = ""
    token: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    delay_s: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "description": "Unauthorized"}, status=401)
        self.calls.append({"at": time.monotonic(), **await request.json()})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status, body = self.answers.pop(0) if self.answers else (200, {"ok": True})
        return web.json_response(body, status=status)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} messages, got {len(self.calls)}")
            await asyncio.sleep(0.05)
        return self.calls


@pytest.fixture
async def bot(aiohttp_server: Any) -> FakeBotApi:
    fake = FakeBotApi(token=secret(f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(26)}"))
    app = web.Application()
    app.router.add_post("/bot{token}/sendMessage", fake.handle)
    # Its access log is Telegram's, not ours: it names the token in every path.
    server = await aiohttp_server(app, access_log=None)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


async def notified_gateway(make_gateway: GatewayFactory, bot: FakeBotApi, **more: Any) -> Gateway:
    return await make_gateway(
        telegram_api_url=bot.url,
        telegram_bot_token=bot.token,
        telegram_chat_id="-100123",
        **more,
    )


async def create(gw: Gateway, receiver: Receiver, **body: Any) -> dict[str, Any]:
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": body.pop("md5", random_md5()), "webhookUrl": receiver.url, **body},
    )
    assert status == 201, created
    return created


async def test_a_payment_is_one_message_with_what_the_shop_owner_needs(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,
    bakong: SimulatedBakong,
    receiver: Receiver,
) -> None:
    gw = await notified_gateway(make_gateway, bot)
    qr = khqr.build(
        account_id="shop@aclb",
        merchant_name="Shop",
        amount="12.5",
        currency="USD",
        bill_number="INV-9",
        expires_at_ms=int(time.time() * 1000) + 600_000,
    )
    paid = await create(gw, receiver, qr=qr, md5=khqr.md5_of(qr), metadata={"orderId": "A-77"})
    failed = await create(gw, receiver)
    bakong.pay(
        paid["md5"],
        amount=12.5,
        currency="USD",
        toAccountId="shop@aclb",
        fromAccountId="dara@wing",
        acknowledgedDateMs=1764547200000,
    )
    bakong.fail(failed["md5"])
    await receiver.wait_for(2)
    [message] = await bot.wait_for(1)
    await asyncio.sleep(1.5)  # several ticks: still one message, none for the failure
    assert len(bot.calls) == 1, bot.calls
    assert message["chat_id"] == "-100123"
    text = message["text"]
    for part in ("12.50 USD", "shop@aclb", "dara@wing", "INV-9", "A-77", "Asia/Phnom_Penh"):
        assert part in text, (part, text)


async def test_no_message_for_a_timeout_and_one_more_for_a_late_payment(
    make_gateway: GatewayFactory, bot: FakeBotApi, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    gw = await notified_gateway(make_gateway, bot, telegram_language="km")
    created = await create(gw, receiver, timeoutSeconds=10)
    await pg.execute(
        "update transactions set deadline_at = now() + interval '200 milliseconds' where id = $1",
        created["jobId"],
    )
    await gw.wait_status(created["jobId"], "timeout")
    await asyncio.sleep(1.0)
    assert bot.calls == []
    # As store.record_late moves it once a late payment is found.
    data = {"amount": 4000, "currency": "KHR", "toAccountId": "shop@aclb", "fromAccountId": "x@y"}
    await pg.execute(
        """
        update transactions set previous_status = status, status = 'success', late = true,
            bakong_data = $2::json, completed_at = now() where id = $1
        """,
        created["jobId"],
        orjson.dumps(data).decode(),
    )
    [message] = await bot.wait_for(1)
    assert "4,000 KHR" in message["text"] and "QR" in message["text"]
    assert "បានទទួលការទូទាត់" in message["text"], "in Khmer, as configured"


async def test_429_retry_after_is_honoured_and_each_attempt_stored(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    bot.answers = [
        (429, {"ok": False, "description": "Too Many Requests", "parameters": {"retry_after": 2}})
    ]
    gw = await notified_gateway(make_gateway, bot)
    created = await create(gw, receiver)
    bakong.pay(created["md5"], amount=1, currency="USD", toAccountId="shop@aclb")
    calls = await bot.wait_for(2, timeout=15)
    assert calls[1]["at"] - calls[0]["at"] >= 1.9, "not before retry_after"
    assert calls[1]["text"] == calls[0]["text"]
    row = await _notice(pg, "sent")
    assert row["attempt_count"] == 2
    codes = await pg.fetch("select status_code from telegram_attempts order by attempt")
    assert [r["status_code"] for r in codes] == [429, 200]


async def _notice(pg: asyncpg.Connection, status: str, timeout: float = 5.0) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await pg.fetchrow("select * from telegram_notices")
        if row is not None and row["status"] == status:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no notice became {status}: {row}")


async def test_a_blocked_bot_stops_and_says_why(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    blocked = {
        "ok": False,
        "error_code": 403,
        "description": "Forbidden: bot was blocked by the user",
    }
    bot.answers = [(403, blocked)] * 5
    gw = await notified_gateway(make_gateway, bot)
    created = await create(gw, receiver)
    bakong.pay(created["md5"], amount=1, currency="USD", toAccountId="shop@aclb")
    row = await _notice(pg, "failed")
    assert row["last_status_code"] == 403
    assert row["last_error"] == "Forbidden: bot was blocked by the user"
    await asyncio.sleep(1.5)
    assert len(bot.calls) == 1, "no retry can unblock a bot"
    # Visible where an operator looks: the API lists the notices that stopped.
    status, listed = await gw.get("/api/v1/notices?status=failed")
    assert status == 200, listed
    [shown] = listed["data"]
    assert shown["jobId"] == created["jobId"] and shown["status"] == "failed"
    assert shown["lastError"] == "Forbidden: bot was blocked by the user"
    assert shown["lastStatusCode"] == 403 and shown["attempts"] == 1
    status, bad = await gw.get("/api/v1/notices?status=lost")
    assert status == 422 and bad["error"]["code"] == "validation_error"


async def test_a_slow_bot_api_never_delays_the_webhook_and_the_token_stays_secret(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    bot.delay_s = 5.0
    gw = await notified_gateway(make_gateway, bot)
    first = await create(gw, receiver)
    bakong.pay(first["md5"], amount=1, currency="USD", toAccountId="shop@aclb")
    await bot.wait_for(1)
    started = time.monotonic()
    second = await create(gw, receiver)
    bakong.pay(second["md5"], amount=2, currency="USD", toAccountId="shop@aclb")
    await receiver.wait_for(2)
    assert time.monotonic() - started < 3.0, "the webhook waited for Telegram"
    metrics = await (await gw.client.get("/metrics")).text()
    assert_no_secret(metrics)
    for path in ("/api/v1/stats", f"/api/v1/transactions/{second['jobId']}"):
        resp = await gw.client.get(path, headers=gw.headers)
        assert_no_secret(await resp.text())


async def test_an_unreachable_bot_api_is_retried_without_the_token_in_its_error(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    gw = await make_gateway(
        telegram_api_url="http://127.0.0.1:9",
        telegram_bot_token=bot.token,
        telegram_chat_id="-100123",
    )
    created = await create(gw, receiver)
    bakong.pay(created["md5"], amount=1, currency="USD", toAccountId="shop@aclb")
    deadline = time.monotonic() + 5
    while not await pg.fetchval("select count(*) from telegram_attempts"):
        assert time.monotonic() < deadline, "no attempt stored"
        await asyncio.sleep(0.05)
    errors = await pg.fetch("select error from telegram_attempts")
    assert errors and all(bot.token not in (r["error"] or "") for r in errors)
    assert await pg.fetchval("select status from telegram_notices") in ("pending", "failed")


async def test_each_app_is_told_of_its_own_payments_by_its_own_bot(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,
    aiohttp_server: Any,
    bakong: SimulatedBakong,
    receiver: Receiver,
) -> None:
    """The default app's payments go to TELEGRAM_CHAT_ID; an app with `telegram` gets its
    own, through its own bot, in its own language, and no other app's."""
    from khqr_gateway.apps import store as apps

    shop_bot = FakeBotApi(token=secret(f"777:{secrets.token_urlsafe(26)}"))
    both = web.Application()  # one Bot API, the two bots told apart by their tokens
    both.router.add_post("/bot{token}/sendMessage", _by_token(bot, shop_bot))
    server = await aiohttp_server(both, access_log=None)
    gw = await make_gateway(
        telegram_api_url=str(server.make_url("")).rstrip("/"),
        telegram_bot_token=bot.token,
        telegram_chat_id="-100123",
    )
    _, key, webhook_secret = await apps.create(
        gw.service.pool,
        "Noodle Bar",
        telegram_chat_id="-100777",
        telegram_bot_token=shop_bot.token,
        telegram_language="km",
    )
    secret(key.key)
    secret(webhook_secret)
    resp = await gw.client.post(
        "/api/v1/transactions",
        json={"md5": random_md5(), "webhookUrl": receiver.url},
        headers={"Authorization": f"Bearer {key.key}"},
    )
    shops = await resp.json()
    mine = await create(gw, receiver)
    bakong.pay(shops["md5"])
    bakong.pay(mine["md5"])
    [theirs] = await shop_bot.wait_for(1)
    [ours] = await bot.wait_for(1)
    await asyncio.sleep(1.0)  # more ticks: still one message each
    assert (len(shop_bot.calls), len(bot.calls)) == (1, 1)
    assert theirs["chat_id"] == "-100777" and ours["chat_id"] == "-100123"
    assert theirs["text"].startswith("✅ បានទទួលការទូទាត់"), "the shop's in Khmer"
    assert ours["text"].startswith("✅ Payment received"), "TELEGRAM_LANGUAGE's default: English"


def _by_token(*bots: FakeBotApi) -> Any:
    async def handle(request: web.Request) -> web.Response:
        for one in bots:
            if request.match_info["token"] == one.token:
                return await one.handle(request)
        return web.json_response({"ok": False, "description": "Unauthorized"}, status=401)

    return handle


@pytest.mark.parametrize(
    ("previous", "language", "title"),
    [
        (Status.TIMEOUT, "en", "✅ Payment received after the QR timed out"),
        (Status.CANCELLED, "en", "✅ Payment received after the payment was cancelled"),
        (Status.CANCELLED, "km", "✅ បានទទួលការទូទាត់ ក្រោយការលុបចោល"),
    ],
)
def test_a_late_payment_says_whether_it_came_after_a_timeout_or_a_cancel(
    previous: Status, language: str, title: str
) -> None:
    notice = DueNotice(
        id=1,
        chat_id="-100",
        attempt_count=0,
        late=True,
        status=Status.SUCCESS,
        reason=None,
        data={"amount": 1, "currency": "USD"},
        metadata=None,
        bill_number=None,
        completed_at=datetime.now(UTC),
        app_id="app_default",
        previous_status=previous,
    )
    assert message_text(notice, language).splitlines()[0] == title


async def test_a_bot_replaced_by_another_has_its_connection_closed(
    make_gateway: GatewayFactory,
    aiohttp_server: Any,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app given a new bot token sends with the new bot, and the old bot's session (its
    kept-alive connection to the Bot API) is closed, not kept for as long as the process."""
    from khqr_gateway.apps import store as apps
    from khqr_gateway.notices import telegram

    monkeypatch.setattr(telegram, "IDLE_S", 0.2)  # no chat at first: asked again soon
    old, new = (FakeBotApi(token=secret(f"77{n}:{secrets.token_urlsafe(26)}")) for n in (1, 2))
    both = web.Application()
    both.router.add_post("/bot{token}/sendMessage", _by_token(old, new))
    server = await aiohttp_server(both, access_log=None)
    gw = await make_gateway(
        telegram_api_url=str(server.make_url("")).rstrip("/"), telegram_chat_id=None
    )
    shop, key, webhook_secret = await apps.create(
        gw.service.pool, "Noodle Bar", telegram_chat_id="-100777", telegram_bot_token=old.token
    )
    secret(key.key)
    secret(webhook_secret)

    async def pay() -> None:
        resp = await gw.client.post(
            "/api/v1/transactions",
            json={"md5": random_md5(), "webhookUrl": receiver.url},
            headers={"Authorization": f"Bearer {key.key}"},
        )
        bakong.pay((await resp.json())["md5"])

    await pay()
    await old.wait_for(1)
    assert len(server.runner.server.connections) == 1, "the old bot's connection, kept alive"
    await apps.update(gw.service.pool, shop.id, {"telegram_bot_token": new.token})
    await pay()
    await new.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(old.calls) == 1
    assert len(server.runner.server.connections) == 1, "the new bot's only"
