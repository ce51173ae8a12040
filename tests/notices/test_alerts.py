"""Operator alerts to a fake Bot API: each episode once when it starts, once when it ends."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from khqr_gateway.notices.alerts import Alerts
from tests.conftest import Gateway, GatewayFactory
from tests.notices.test_telegram import FakeBotApi, bot  # noqa: F401 (the fixture)


async def alerting(make_gateway: GatewayFactory, fake: FakeBotApi, **more: Any) -> Gateway:
    return await make_gateway(
        telegram_api_url=fake.url,
        telegram_bot_token=fake.token,
        telegram_alert_chat_id="-100999",
        run_ticks=False,
        **more,
    )


def alerts_of(gw: Gateway) -> Alerts:
    assert gw.service.alerts is not None
    return gw.service.alerts


async def test_an_expiring_credential_is_announced_once_and_its_end_once(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
    pg: asyncpg.Connection,
) -> None:
    gw = await alerting(make_gateway, bot)
    # Another process of the same deployment: it must not announce the episode again.
    other = await alerting(make_gateway, bot)
    await alerts_of(gw).tick()
    assert bot.calls == [], "nothing wrong yet"
    await pg.execute(
        "update credentials set expires_at = now() + interval '1 day' where is_default"
    )
    for _ in range(3):
        await alerts_of(gw).tick()
        await alerts_of(other).tick()
    [alert] = bot.calls
    assert alert["chat_id"] == "-100999"
    assert "credential" in alert["text"] and "expires" in alert["text"]
    await pg.execute("update credentials set expires_at = now() + interval '60 days'")
    await alerts_of(other).tick()
    await alerts_of(gw).tick()
    assert len(bot.calls) == 2 and "fine again" in bot.calls[1]["text"]
    await pg.execute("update credentials set status = 'expired'")
    await alerts_of(gw).tick()
    assert len(bot.calls) == 3 and "has expired" in bot.calls[2]["text"], "a new episode"


async def test_bakong_failing_for_five_minutes_and_deliveries_for_fifteen(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
    pg: asyncpg.Connection,
) -> None:
    gw = await alerting(make_gateway, bot)
    alerts = alerts_of(gw)
    for _ in range(3):
        alerts.recent.add("timeout")
    await alerts.tick(now=1000.0)
    await alerts.tick(now=1200.0)
    assert bot.calls == [], "not yet five minutes"
    await alerts.tick(now=1301.0)
    [alert] = bot.calls
    assert "Bakong" in alert["text"]
    alerts.recent.add("ok")
    await alerts.tick(now=1302.0)
    assert len(bot.calls) == 2 and "Bakong is fine again" in bot.calls[1]["text"]

    job = uuid.uuid4()
    await pg.execute(
        "insert into transactions (id, md5, status, webhook_url, deadline_at)"
        " values ($1, md5('x'), 'success', 'http://x/hook', now())",
        job,
    )
    await pg.execute(
        "insert into deliveries (id, transaction_id, url, payload, attempt_count, created_at)"
        " values ('msg_1', $1, 'http://x/hook', '{}', 1, now() - interval '10 minutes')",
        job,
    )
    await alerts.tick(now=1303.0)
    assert len(bot.calls) == 2, "retrying for 10 minutes is not yet an alert"
    await pg.execute("update deliveries set created_at = now() - interval '16 minutes'")
    await alerts.tick(now=1304.0)
    assert len(bot.calls) == 3 and "deliveries" in bot.calls[2]["text"]
    await pg.execute("update deliveries set status = 'delivered'")
    await alerts.tick(now=1305.0)
    assert len(bot.calls) == 4 and "fine again" in bot.calls[3]["text"]


async def test_an_alert_not_sent_is_sent_at_the_next_tick(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
    pg: asyncpg.Connection,
) -> None:
    bot.answers = [(502, {"ok": False, "description": "Bad Gateway"})]
    gw = await alerting(make_gateway, bot)
    await pg.execute("update credentials set status = 'expired'")
    await alerts_of(gw).tick()
    await alerts_of(gw).tick()
    assert len(bot.calls) == 2 and bot.calls[0]["text"] == bot.calls[1]["text"]
    await alerts_of(gw).tick()
    assert len(bot.calls) == 2
