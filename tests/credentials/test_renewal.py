"""Bakong credentials: JWT expiry, the credentials API (tokens never shown), the token tick,
renewal exactly once across processes, and unrenewable credentials reported honestly."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import generate_latest

from khqr_gateway.bakong.sandbox import make_token
from khqr_gateway.config import AppEnv, Settings
from khqr_gateway.credentials.model import (
    Credential,
    CredentialStatus,
    expiry_seconds,
    jwt_expiry,
    token_expired,
)
from khqr_gateway.credentials.renewal import NoToken
from khqr_gateway.metrics import REGISTRY
from tests.conftest import (
    Gateway,
    GatewayFactory,
    Receiver,
    SimulatedBakong,
    random_md5,
    secret,
)

DAY = 86_400


def test_jwt_expiry_reads_the_exp_claim_without_a_signature_check() -> None:
    token = make_token(exp=1_900_000_000)
    assert jwt_expiry(token) == datetime.fromtimestamp(1_900_000_000, UTC)
    assert not token_expired(token, now=1_899_999_999)
    assert token_expired(token, now=1_900_000_000)


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "a.e30.c", "a.eyJleHAiOiJ4In0.c"])
def test_unreadable_tokens_have_no_expiry_and_are_not_called_expired(token: str) -> None:
    assert jwt_expiry(token) is None
    assert not token_expired(token)


def test_expiry_seconds_is_zero_or_less_for_an_unusable_credential() -> None:
    exp = datetime.fromtimestamp(1_000 + 3 * DAY, UTC)
    active = Credential(1, "t", None, exp, CredentialStatus.ACTIVE)
    assert expiry_seconds(active, now=1_000) == 3 * DAY
    assert expiry_seconds(Credential(1, "t", None, exp, CredentialStatus.EXPIRED), now=1_000) == 0
    assert (
        expiry_seconds(Credential(1, None, "a@b.co", None, CredentialStatus.ACTIVE), now=1_000) == 0
    )


# The API ------------------------------------------------------------------------------


async def test_post_and_list_credentials_never_show_a_token(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    token = make_token("shop@example.com")
    status, added = await gateway.post("/api/v1/credentials", {"token": token})
    assert status == 201
    assert added["hasToken"] is True and added["status"] == "active"
    assert added["expiresAt"] is not None and added["email"] is None
    status, again = await gateway.post("/api/v1/credentials", {"token": token})
    assert status == 200, "the same token is the same credential"
    assert again["id"] == added["id"]

    resp = await gateway.client.get("/api/v1/credentials", headers=gateway.headers)
    raw = await resp.text()
    assert resp.status == 200
    assert token not in raw and bakong.token not in raw
    assert token.split(".")[2] not in raw, "not even the signature part"
    page = await resp.json()
    assert [c["id"] for c in page["data"]] == [1, added["id"]]
    default = page["data"][0]
    assert default["isDefault"] is True and default["hasToken"] is True
    assert set(default) == {
        "id",
        "email",
        "hasToken",
        "expiresAt",
        "status",
        "isDefault",
        "lastError",
        "createdAt",
        "updatedAt",
    }


async def test_an_email_credential_gets_its_token_at_once(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    status, added = await gateway.post("/api/v1/credentials", {"email": "Shop@Example.com"})
    assert status == 201
    assert added["hasToken"] is True and added["status"] == "active"
    assert bakong.state.calls["renew_token"] == 1
    status, again = await gateway.post("/api/v1/credentials", {"email": "shop@example.com"})
    assert status == 200 and again["id"] == added["id"], "emails dedupe case-insensitively"
    assert bakong.state.calls["renew_token"] == 1, "it has a good token: no renewal"


async def test_an_unregistered_email_is_stored_and_reported_expired(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    bakong.state.registered_emails = {"someone@else.com"}
    status, added = await gateway.post("/api/v1/credentials", {"email": "nobody@example.com"})
    assert status == 201
    assert added["status"] == "expired"
    assert added["hasToken"] is False
    assert "not_registered" in added["lastError"]
    _, page = await gateway.get("/api/v1/credentials?status=expired")
    assert [c["id"] for c in page["data"]] == [added["id"]]
    # Registered later: adding it again revives it.
    bakong.state.registered_emails = None
    status, revived = await gateway.post("/api/v1/credentials", {"email": "nobody@example.com"})
    assert status == 200
    assert revived["status"] == "active" and revived["lastError"] is None


async def test_an_expired_token_alone_is_refused_but_an_email_rescues_it(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    old = make_token(exp=int(time.time()) - 60)
    status, body = await gateway.post("/api/v1/credentials", {"token": old})
    assert status == 422
    assert body["error"]["details"][0]["field"] == "token"
    status, body = await gateway.post("/api/v1/credentials", {})
    assert status == 422
    status, body = await gateway.post(
        "/api/v1/credentials", {"token": old, "email": "shop@example.com"}
    )
    assert status == 201
    assert body["status"] == "active"
    assert datetime.fromisoformat(body["expiresAt"]).timestamp() > time.time() + 80 * DAY


async def test_credentials_page_with_a_cursor(gateway: Gateway) -> None:
    for n in range(3):
        await gateway.post("/api/v1/credentials", {"email": f"shop{n}@example.com"})
    _, first = await gateway.get("/api/v1/credentials?limit=2")
    assert first["hasMore"] is True
    _, second = await gateway.get(f"/api/v1/credentials?limit=2&cursor={first['nextCursor']}")
    assert second["hasMore"] is False
    ids = [c["id"] for c in first["data"] + second["data"]]
    assert ids == sorted(set(ids)) and len(ids) == 4
    status, _ = await gateway.get("/api/v1/credentials?cursor=zzz")
    assert status == 422


# The token tick and renewal -----------------------------------------------------------


async def test_token_tick_renews_only_tokens_expiring_within_the_window(
    make_gateway: GatewayFactory, bakong: SimulatedBakong
) -> None:
    soon = make_token("shop@example.com", exp=int(time.time()) + 2 * DAY)
    gw = await make_gateway(bakong_token=soon, bakong_email="shop@example.com", run_ticks=False)
    await gw.post("/api/v1/credentials", {"token": make_token(exp=int(time.time()) + 30 * DAY)})
    await gw.service.credentials.tick()
    assert bakong.state.calls["renew_token"] == 1, "only the default: 2 days left < 7"
    _, page = await gw.get("/api/v1/credentials")
    default = page["data"][0]
    assert datetime.fromisoformat(default["expiresAt"]).timestamp() > time.time() + 80 * DAY
    await gw.service.credentials.tick()
    assert bakong.state.calls["renew_token"] == 1, "renewed: nothing to do"
    metrics = generate_latest(REGISTRY).decode()
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith('khqr_bakong_token_expiry_seconds{credential="default"}')
    )
    assert float(line.split()[-1]) > 80 * DAY
    assert soon not in metrics


def expiry_series() -> dict[str, float]:
    """khqr_bakong_token_expiry_seconds by its credential label."""
    series = {}
    for m in REGISTRY.collect():
        if m.name == "khqr_bakong_token_expiry_seconds":
            series.update({s.labels["credential"]: s.value for s in m.samples})
    return series


async def test_per_transaction_tokens_share_one_metric_series(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    now = int(time.time())
    for n in range(50):
        token = make_token(f"shop{n}@example.com", exp=now + (3 + n) * DAY)
        body = {"md5": random_md5(), "webhookUrl": receiver.url, "token": token}
        status, _ = await gateway.post("/api/v1/transactions", body)
        assert status == 201
    _, page = await gateway.get("/api/v1/credentials?limit=100")
    assert len(page["data"]) == 51, "each distinct token is a credential of its own"
    await gateway.service.credentials.tick()
    series = expiry_series()
    assert set(series) == {"default", "per_transaction"}, "50 tokens, not 50 series"
    default_left = (jwt_expiry(bakong.token) or datetime.now(UTC)).timestamp() - time.time()
    assert series["default"] == pytest.approx(default_left, abs=60)
    assert series["per_transaction"] == pytest.approx(3 * DAY, abs=60), "the soonest to expire"
    text = generate_latest(REGISTRY).decode()
    assert 'khqr_bakong_credentials{credential="per_transaction",status="active"} 50.0' in text
    assert 'khqr_bakong_credentials{credential="default",status="active"} 1.0' in text


async def test_concurrent_renewals_in_one_process_happen_once(
    make_gateway: GatewayFactory, bakong: SimulatedBakong
) -> None:
    gw = await make_gateway(bakong_email="shop@example.com", run_ticks=False)
    credentials = gw.service.credentials
    assert credentials.default_id is not None
    bakong.state.faults.delay_s = 0.2  # a slow renew_token: the callers really overlap
    tokens = await asyncio.gather(
        *(credentials.renew(credentials.default_id, stale=bakong.token) for _ in range(20))
    )
    assert bakong.state.calls["renew_token"] == 1
    assert len(set(tokens)) == 1 and tokens[0] != bakong.token


async def test_renewal_happens_once_across_processes(
    make_gateway: GatewayFactory, bakong: SimulatedBakong
) -> None:
    soon = make_token("shop@example.com", exp=int(time.time()) + DAY)
    one = await make_gateway(bakong_token=soon, bakong_email="shop@example.com", run_ticks=False)
    two = await make_gateway(bakong_token=soon, bakong_email="shop@example.com", run_ticks=False)
    assert one.service.credentials is not two.service.credentials
    bakong.state.faults.delay_s = 0.2
    await asyncio.gather(
        one.service.credentials.tick(),
        two.service.credentials.tick(),
        *(one.service.credentials.renew(1, stale=soon, rejected=False) for _ in range(3)),
        *(two.service.credentials.renew(1, stale=soon, rejected=False) for _ in range(3)),
    )
    assert bakong.state.calls["renew_token"] == 1
    assert await one.service.credentials.token(None) == await two.service.credentials.token(None)


async def test_a_failing_renewal_keeps_a_token_that_still_works(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    soon = make_token("shop@example.com", exp=int(time.time()) + DAY)
    gw = await make_gateway(bakong_token=soon, bakong_email="shop@example.com", run_ticks=False)
    bakong.state.registered_emails = set()
    with caplog.at_level(logging.WARNING):
        await gw.service.credentials.tick()
        await gw.service.credentials.tick()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "said loudly once, then quietly"
    _, page = await gw.get("/api/v1/credentials")
    assert page["data"][0]["status"] == "active", "the token works for another day"
    assert "not_registered" in page["data"][0]["lastError"]


# Unusable credentials -----------------------------------------------------------------


async def test_expired_unrenewable_default_times_out_as_unauthorized_and_is_reported(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = make_token("gone@example.com", exp=int(time.time()) - 60)
    bakong.state.registered_emails = set()
    caplog.set_level(logging.INFO)
    gw = await make_gateway(bakong_token=dead, bakong_email="gone@example.com")
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "timeoutSeconds": 10},
    )
    assert status == 201
    await asyncio.sleep(0.5)
    _, body = await gw.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["status"] == "pending", "no false answer before the deadline"
    await pg.execute("update transactions set deadline_at = now() where id = $1", created["jobId"])
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["status"] == "timeout"
    assert hook.json()["reason"] == "bakong_unauthorized"
    assert bakong.state.calls["renew_token"] <= 2, "no renewal storm: once, then the tick's"

    resp = await gw.client.get("/ready")
    ready = await resp.json()
    assert resp.status == 200, "an operator fixes a token; restarting would not"
    assert ready["status"] == "degraded"
    assert ready["bakong"]["defaultCredential"]["status"] == "expired"
    assert "not_registered" in ready["bakong"]["defaultCredential"]["lastError"]
    assert "bakong_unauthorized" in ready["bakong"]["problem"]
    assert ready["bakong"]["expiredCredentials"] == [1]

    expired_logs = [r for r in caplog.records if "credential expired" in r.getMessage()]
    assert expired_logs and all(r.levelno == logging.ERROR for r in expired_logs[:1])
    metrics = (await (await gw.client.get("/metrics")).text()).splitlines()
    line = next(
        m for m in metrics if m.startswith('khqr_bakong_token_expiry_seconds{credential="default"}')
    )
    assert float(line.split()[-1]) <= 0
    _assert_never_logged(caplog, dead)


async def test_a_revoked_token_without_email_is_marked_expired(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    token = make_token("merchant@example.com")
    bakong.state.revoked.add(token)
    status, created = await gateway.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "token": token, "timeoutSeconds": 10},
    )
    assert status == 201
    await asyncio.sleep(0.5)
    _, page = await gateway.get("/api/v1/credentials?status=expired")
    [cred] = page["data"]
    assert "rejected" in cred["lastError"]
    calls = sum(bakong.state.calls.values())
    await asyncio.sleep(0.5)
    assert sum(bakong.state.calls.values()) == calls, "an expired credential is not called"
    await pg.execute("update transactions set deadline_at = now() where id = $1", created["jobId"])
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["reason"] == "bakong_unauthorized"
    resp = await gateway.client.get("/ready")
    ready = await resp.json()
    assert resp.status == 200 and ready["status"] == "ok", "the default credential is fine"
    assert ready["bakong"]["expiredCredentials"] == [cred["id"]]


async def test_tokens_never_reach_logs_webhooks_or_metrics(
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = make_token("merchant@example.com")
    status, created = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url, "token": token}
    )
    assert status == 201
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    assert token not in hook.body.decode()
    assert all(token not in v for v in hook.headers.values())
    metrics = await (await gateway.client.get("/metrics")).text()
    assert token not in metrics and bakong.token not in metrics
    _assert_never_logged(caplog, token)
    _assert_never_logged(caplog, bakong.token)


def _assert_never_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert secret not in text, f"a token was logged: {record.getMessage()}"
        assert secret.split(".")[2] not in text


async def test_an_expired_email_credential_revives_once_the_email_works(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("khqr_gateway.credentials.renewal.EXPIRED_RETRY_S", 0.4)
    bakong.state.registered_emails = set()
    gw = await make_gateway(bakong_token=None, bakong_email="late@example.com")
    status, created = await gw.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    await asyncio.sleep(1.0)
    _, page = await gw.get("/api/v1/credentials")
    assert page["data"][0]["status"] == "expired"
    assert bakong.state.calls["renew_token"] <= 4, "tried again now and then, not every tick"
    bakong.state.registered_emails = None  # the merchant registers the email
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["status"] == "success"
    _, page = await gw.get("/api/v1/credentials")
    assert page["data"][0]["status"] == "active" and page["data"][0]["lastError"] is None


async def _ready(gw: Gateway) -> dict[str, Any]:
    resp = await gw.client.get("/ready")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def _wait_ready(gw: Gateway, status: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    ready = await _ready(gw)
    while ready["status"] != status and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        ready = await _ready(gw)
    assert ready["status"] == status, ready
    return ready


async def test_a_refused_default_token_is_asked_again_and_revives_once_accepted(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("khqr_gateway.credentials.renewal.REFUSED_PROBE_FIRST_S", 0.2)
    monkeypatch.setattr("khqr_gateway.credentials.renewal.REFUSED_PROBE_MAX_S", 0.4)
    gw = await make_gateway()  # the default credential: BAKONG_TOKEN alone, exp 90 days ahead
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "timeoutSeconds": 60},
    )
    assert status == 201
    bakong.state.revoked.add(bakong.token)  # Bakong refuses it for a while (401)
    ready = await _wait_ready(gw, "degraded")
    assert ready["bakong"]["defaultCredential"]["status"] == "expired"
    bakong.pay(created["md5"])
    await asyncio.sleep(1.0)
    assert receiver.received == [], "no answer while refused, and certainly no false one"
    _, body = await gw.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["status"] == "pending"

    bakong.state.revoked.discard(bakong.token)  # Bakong accepts the token again
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["status"] == "success"
    _, page = await gw.get("/api/v1/credentials")
    assert page["data"][0]["status"] == "active" and page["data"][0]["lastError"] is None
    ready = await _wait_ready(gw, "ok")
    assert "problem" not in ready["bakong"]


async def test_a_token_past_its_exp_stays_expired_and_is_not_asked_again(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("khqr_gateway.credentials.renewal.REFUSED_PROBE_FIRST_S", 0.1)
    monkeypatch.setattr("khqr_gateway.credentials.renewal.REFUSED_PROBE_MAX_S", 0.1)
    dead = secret(make_token(exp=int(time.time()) - 60))
    gw = await make_gateway(bakong_token=dead)
    status, _ = await gw.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "timeoutSeconds": 60},
    )
    assert status == 201
    ready = await _wait_ready(gw, "degraded")
    assert "expired" in ready["bakong"]["defaultCredential"]["lastError"]
    await asyncio.sleep(1.0)
    assert sum(bakong.state.calls.values()) == 0, "Bakong would refuse it: never asked"
    assert (await _ready(gw))["status"] == "degraded"


async def test_a_refused_token_is_asked_about_once_per_doubling_backoff(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("khqr_gateway.credentials.renewal.REFUSED_PROBE_FIRST_S", 0.5)
    monkeypatch.setattr("khqr_gateway.credentials.renewal.REFUSED_PROBE_MAX_S", 60.0)
    gw = await make_gateway(run_ticks=False)
    credentials = gw.service.credentials

    def probes() -> int:
        return bakong.state.calls["check_transaction_by_md5"]

    bakong.state.revoked.add(bakong.token)
    with pytest.raises(NoToken):  # what a check does on its 401
        await credentials.renew(1, stale=bakong.token)
    with pytest.raises(NoToken):
        await credentials.token(None)
    assert probes() == 0, "not asked again before the first backoff"
    await asyncio.sleep(0.6)
    answers = await asyncio.gather(
        *(credentials.token(None) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(a, NoToken) for a in answers)
    assert probes() == 1, "one caller asks; the others do not pile on"
    await asyncio.sleep(0.5)
    with pytest.raises(NoToken):
        await credentials.token(None)
    assert probes() == 1, "refused again: the wait doubled to 1 s"
    await asyncio.sleep(0.6)
    bakong.state.revoked.discard(bakong.token)
    assert await credentials.token(None) == bakong.token
    assert probes() == 2
    _, page = await gw.get("/api/v1/credentials")
    assert page["data"][0]["status"] == "active"


async def test_ready_is_degraded_naming_the_variables_when_there_is_no_bakong_credential(
    make_gateway: GatewayFactory,
) -> None:
    """In production with neither BAKONG_TOKEN nor BAKONG_EMAIL, every transaction that
    brings no token is refused: /ready says so before the first one does."""
    gw = await make_gateway(app_env=AppEnv.PRODUCTION, bakong_token=None, bakong_email=None)
    resp = await gw.client.get("/ready")
    ready = await resp.json()
    assert resp.status == 200, "the API still works for transactions with their own token"
    assert ready["status"] == "degraded"
    assert ready["bakong"]["defaultCredential"] is None
    assert "BAKONG_TOKEN" in ready["bakong"]["problem"]
    assert "BAKONG_EMAIL" in ready["bakong"]["problem"]


async def test_ready_is_ok_with_a_default_credential(gateway: Gateway) -> None:
    ready = await (await gateway.client.get("/ready")).json()
    assert ready["status"] == "ok" and "problem" not in ready["bakong"]


def test_start_up_warns_when_there_is_no_bakong_credential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from khqr_gateway.cli import _warn

    caplog.set_level(logging.WARNING)
    _warn(Settings(app_env=AppEnv.PRODUCTION, api_keys=("k" * 32,)))
    [line] = [r.getMessage() for r in caplog.records if "BAKONG" in r.getMessage()]
    assert "BAKONG_TOKEN" in line and "BAKONG_EMAIL" in line
    caplog.clear()
    _warn(Settings(app_env=AppEnv.PRODUCTION, bakong_email="shop@example.com"))
    assert not [r for r in caplog.records if "BAKONG" in r.getMessage()]
