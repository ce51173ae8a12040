"""Operator alerts to a fake Bot API: each episode once when it starts, once when it ends."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from khqr_gateway.bakong import client
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


async def paid_transaction(pg: asyncpg.Connection) -> uuid.UUID:
    """A paid transaction for a delivery row to belong to."""
    job = uuid.uuid4()
    await pg.execute(
        "insert into transactions (id, md5, status, webhook_url, deadline_at)"
        " values ($1, md5('x'), 'success', 'http://x/hook', now())",
        job,
    )
    return job


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
    for at in (1000.0, 1200.0):
        alerts.recent.add("timeout", now=at)
        await alerts.tick(now=at)
    assert bot.calls == [], "not yet five minutes"
    alerts.recent.add("timeout", now=1301.0)
    await alerts.tick(now=1301.0)
    [alert] = bot.calls
    assert "Bakong" in alert["text"]
    alerts.recent.add("ok", now=1302.0)
    await alerts.tick(now=1302.0)
    assert len(bot.calls) == 2 and "Bakong is fine again" in bot.calls[1]["text"]

    job = await paid_transaction(pg)
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


async def test_bakong_breaking_after_good_answers_is_announced_five_minutes_later(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Good answers until Bakong breaks, then a failed call every 10 s: the alert comes once
    the calls have failed for 5 minutes, not once the good ones left the 5-minute window of
    /api/v1/stats and that held 5 minutes more (10 minutes in all)."""
    gw = await alerting(make_gateway, bot)
    alerts = alerts_of(gw)
    clock = [time.time()]
    # The calls' window reads this clock too, so that 7 minutes pass in a moment.
    monkeypatch.setattr(client, "time", SimpleNamespace(time=lambda: clock[0]))
    start = clock[0]
    for s in range(0, 60, 10):
        clock[0] = start + s
        alerts.recent.add("ok", now=clock[0])
    for s in range(60, 420, 10):  # broken from 60 s on
        clock[0] = start + s
        alerts.recent.add("timeout", now=clock[0])
        await alerts.tick(now=clock[0])
        if s < 355:
            assert bot.calls == [], f"failing for {s - 60} s only"
    assert len(bot.calls) == 1 and "Bakong" in bot.calls[0]["text"]


async def test_two_bakong_failures_an_hour_apart_are_no_alert(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
) -> None:
    """A quiet deployment: one call fails before a lull, another an hour later. Nothing was
    seen failing for 5 minutes; the lull (no call, no evidence) starts the clock again."""
    gw = await alerting(make_gateway, bot)
    alerts = alerts_of(gw)
    alerts.recent.add("timeout", now=1000.0)
    for at in range(1010, 1200, 10):
        await alerts.tick(now=float(at))
    alerts.recent.add("timeout", now=5000.0)
    await alerts.tick(now=5001.0)
    assert bot.calls == []


async def test_a_webhook_refused_with_410_at_once_is_no_alert(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
    pg: asyncpg.Connection,
) -> None:
    """410 stops a webhook at its first attempt: the receiver's answer, not deliveries
    failing for 15 minutes."""
    gw = await alerting(make_gateway, bot)
    job = await paid_transaction(pg)
    await pg.execute(
        "insert into deliveries (id, transaction_id, url, payload, status, attempt_count,"
        " created_at, last_attempt_at) values ('msg_1', $1, 'http://x/hook', '{}', 'failed',"
        " 1, now() - interval '2 seconds', now() - interval '1 second')",
        job,
    )
    await alerts_of(gw).tick()
    assert bot.calls == []


async def test_deliveries_that_gave_up_keep_the_alert_firing_for_fifteen_minutes(
    make_gateway: GatewayFactory,
    bot: FakeBotApi,  # noqa: F811
    pg: asyncpg.Connection,
) -> None:
    """A webhook that ran out of retries was not delivered: that is no "fine again". The
    episode ends once none is retrying past 15 minutes and none gave up in the last 15."""
    gw = await alerting(make_gateway, bot)
    alerts = alerts_of(gw)
    job = await paid_transaction(pg)
    await pg.execute(
        "insert into deliveries (id, transaction_id, url, payload, attempt_count, created_at,"
        " last_attempt_at) values ('msg_1', $1, 'http://x/hook', '{}', 5,"
        " now() - interval '70 minutes', now() - interval '1 minute')",
        job,
    )
    await alerts.tick()
    [alert] = bot.calls
    assert "deliveries" in alert["text"]
    await pg.execute("update deliveries set status = 'failed', next_attempt_at = null")
    await alerts.tick()
    assert len(bot.calls) == 1, "gave up a minute ago: still failing, nothing delivered"
    await pg.execute("update deliveries set last_attempt_at = now() - interval '16 minutes'")
    await alerts.tick()
    assert len(bot.calls) == 2 and "fine again" in bot.calls[1]["text"]


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
