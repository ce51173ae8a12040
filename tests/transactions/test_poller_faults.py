"""Bakong misbehaving (500s, 429s, timeouts, slow and malformed replies) never produces a false
answer: a payment made meanwhile is reported once Bakong recovers, and only Bakong staying
silent through the deadline and the grace period times a transaction out, saying so. Also
the polling discipline: the shared rate limit, calls in flight, the circuit breaker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from khqr_gateway.bakong.sandbox import Faults
from khqr_gateway.transactions import checker as checker_module
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5

CHECKS = ("check_transaction_by_md5", "check_transaction_by_md5_list")


async def create(gw: Gateway, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    status, body = await gw.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url, **extra}
    )
    assert status == 201, body
    return body


def check_times(bakong: SimulatedBakong, since: float = 0.0) -> list[float]:
    return [t for t, name in bakong.state.call_log if name in CHECKS and t >= since]


def busiest_window(times: list[float], width: float) -> int:
    """The most calls in any window of `width` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


async def still_pending(gw: Gateway, job_id: str) -> None:
    _, body = await gw.get(f"/api/v1/transactions/{job_id}")
    assert body["status"] == "pending", body


FAULTS = {
    "500": Faults(status=500),
    "503": Faults(status=503),
    "429": Faults(status=429),
    "timeout": Faults(delay_s=1.0),
    "malformed html": Faults(malformed="html"),
    "malformed shape": Faults(malformed="shape"),
}


@pytest.mark.parametrize("fault", FAULTS, ids=list(FAULTS))
async def test_a_payment_made_while_bakong_misbehaves_is_reported_once_it_recovers(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver, fault: str
) -> None:
    gw = await make_gateway(bakong_timeout_s=0.5)
    created = await create(gw, receiver)
    bakong.state.faults = FAULTS[fault]
    bakong.pay(created["md5"])
    await asyncio.sleep(1.5)
    assert receiver.received == [], "no answer yet, and certainly no false one"
    await still_pending(gw, created["jobId"])
    assert check_times(bakong), "it kept trying"
    bakong.state.faults = Faults()
    [hook] = await receiver.wait_for(1, timeout=8)
    assert hook.json()["status"] == "success"


@pytest.mark.parametrize("fault", ["500", "429", "timeout", "malformed html"])
async def test_bakong_silent_through_deadline_and_grace_times_out_as_unreachable(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
    fault: str,
) -> None:
    gw = await make_gateway(bakong_timeout_s=0.5)
    created = await create(gw, receiver, timeoutSeconds=10)
    bakong.state.faults = FAULTS[fault]
    await asyncio.sleep(0.5)
    deadline = time.monotonic()
    await pg.execute("update transactions set deadline_at = now() where id = $1", created["jobId"])
    [hook] = await receiver.wait_for(1, timeout=8)
    assert time.monotonic() - deadline >= 1.0, "not before the 1 s grace of these tests ended"
    assert hook.json()["status"] == "timeout"
    assert hook.json()["reason"] == "bakong_unreachable"


async def test_slow_replies_within_the_timeout_are_answers(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    bakong.state.faults = Faults(delay_s=0.3)
    paid = await create(gateway, receiver)
    unpaid = await create(gateway, receiver, timeoutSeconds=10)
    bakong.pay(paid["md5"])
    await pg.execute("update transactions set deadline_at = now() where id = $1", unpaid["jobId"])
    hooks = await receiver.wait_for(2)
    by_job = {h.json()["jobId"]: h.json() for h in hooks}
    assert by_job[paid["jobId"]]["status"] == "success"
    assert by_job[unpaid["jobId"]]["reason"] == "not_paid"


async def test_429_retry_after_pauses_the_credential(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    created = await create(gateway, receiver)
    bakong.state.faults = Faults(status=429, retry_after="1", remaining=1)
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["status"] == "success"
    throttled_at, *later = check_times(bakong)  # the first check got the 429
    assert later, "asked again after the pause"
    assert later[0] - throttled_at >= 0.95, "nothing sent during Retry-After"


async def test_429s_without_retry_after_slow_that_credential(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    await create(gateway, receiver)
    bakong.state.faults = Faults(status=429)
    start = time.monotonic()
    await asyncio.sleep(2.0)
    calls = len(check_times(bakong, since=start))
    # Unthrottled it would ask 10 times in 2 s (every 0.2 s); backing off 0.2, 0.4, 0.8...
    assert 2 <= calls <= 5, calls


async def test_circuit_breaker_opens_during_an_outage_and_closes_after(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    gw = await make_gateway(bakong_max_rps=1000)
    jobs = await asyncio.gather(*(create(gw, receiver) for _ in range(120)))  # 3 calls a round
    bakong.state.faults = Faults(status=500)
    bakong.pay(jobs[0]["md5"])
    await asyncio.sleep(1.5)
    _, stats = await gw.get("/api/v1/stats")
    assert stats["bakong"]["circuits"].get("1") in ("open", "half_open")
    quiet_from = time.monotonic()
    await asyncio.sleep(2.0)
    # Closed it would make about 30 calls in 2 s; open, it only probes (every 0.8, 1.6, 2 s).
    assert len(check_times(bakong, since=quiet_from)) <= 3
    await still_pending(gw, jobs[0]["jobId"])

    bakong.state.faults = Faults()
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["jobId"] == jobs[0]["jobId"] and hook.json()["status"] == "success"
    _, stats = await gw.get("/api/v1/stats")
    assert stats["bakong"]["circuits"] == {}
    _, ready = await gw.get("/ready")
    assert ready["bakong"]["circuits"] == {}


async def test_the_rate_limit_holds_across_two_gateways(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    one = await make_gateway(bakong_max_rps=5)
    two = await make_gateway(bakong_max_rps=5)
    bakong.state.faults = Faults(list_status=403)  # per-md5 checks: one call per md5
    jobs = [await create(one if n % 2 else two, receiver) for n in range(12)]
    await asyncio.sleep(0.5)
    start = time.monotonic()
    await asyncio.sleep(3.0)
    times = check_times(bakong, since=start)
    # Wanted: 12 md5s every 0.2 s = 60 calls a second. Allowed: a 5-call bucket, 5 a second.
    # The budget asks each md5 every 2.5 s (95% of the rate): over one such round at least.
    assert busiest_window(times, 1.0) <= 10
    assert len(times) <= 5 + 5 * 3
    assert len(times) >= 10, "the budget is used, not wasted"

    paid = time.monotonic()
    bakong.pay(jobs[7]["md5"])
    [hook] = await receiver.wait_for(1, timeout=10)
    assert hook.json()["status"] == "success", "held-back md5s are still checked"
    # Every md5 gets its turn: 12 calls at 5 a second is a round of about 2.4 s.
    assert time.monotonic() - paid < 6
    for job in jobs[:3]:
        await still_pending(one, job["jobId"])


async def test_calls_in_flight_are_bounded(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    jobs = [await create(gateway, receiver, timeoutSeconds=10) for _ in range(30)]
    bakong.state.faults = Faults(delay_s=0.3)
    # 30 final checks at once: one per-md5 call each.
    await pg.execute(
        "update transactions set deadline_at = now() where id = any($1::uuid[])",
        [j["jobId"] for j in jobs],
    )
    hooks = await receiver.wait_for(30, timeout=15)
    assert {h.json()["reason"] for h in hooks} == {"not_paid"}
    assert 1 < bakong.state.peak_in_flight <= 8


async def test_a_token_that_cannot_be_sent_stops_only_its_own_checks(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    # Stored before validation refused such tokens: aiohttp will not send it as a header.
    bad = await gateway.service.pool.fetchval(
        "insert into credentials (fingerprint, token) values ('bad', 'abc' || chr(10) || 'def')"
        " returning id"
    )
    status, stuck = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    await gateway.service.pool.execute(
        "update transactions set credential_id = $1 where id = $2", bad, stuck["jobId"]
    )
    status, fine = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    bakong.pay(fine["md5"])
    [hook] = await receiver.wait_for(1)
    assert hook.json()["jobId"] == fine["jobId"]


async def test_a_nul_in_bakongs_reply_neither_fails_its_batch_nor_reaches_postgres(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    """Bakong's currency and account are copied into a mismatch's `reason`: a NUL there must
    cost neither that transition nor the unrelated payment checked in the same batch."""
    odd = {"md5": random_md5(), "webhookUrl": receiver.url, "expected": {"currency": "USD"}}
    plain = {"md5": random_md5(), "webhookUrl": receiver.url}
    for body in (odd, plain):
        status, _ = await gateway.post("/api/v1/transactions", body)
        assert status == 201
    bakong.pay(odd["md5"], currency="US\x00D", toAccountId="shop\x00@devb")
    bakong.pay(plain["md5"])
    await receiver.wait_for(2, timeout=5)
    rows = {r["md5"]: r for r in await pg.fetch("select md5, status, reason from transactions")}
    assert rows[plain["md5"]]["status"] == "success"
    assert rows[odd["md5"]]["status"] == "mismatch"
    assert "\x00" not in rows[odd["md5"]]["reason"] and "currency" in rows[odd["md5"]]["reason"]


async def backdate(gw: Gateway, jobs: list[dict[str, Any]], minutes: int) -> None:
    await gw.service.pool.execute(
        "update transactions set created_at = now() - make_interval(mins => $2)"
        " where id = any($1::uuid[])",
        [j["jobId"] for j in jobs],
        minutes,
    )


async def test_the_list_endpoint_refused_spends_the_budget_on_young_md5s_first(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    """One call per md5 at 20 a second: 3 md5s just created, 24 created 10 minutes ago and 3
    reaching their deadline. Checked alike, each would be asked every 1.5 s."""
    gw = await make_gateway(bakong_max_rps=20, run_ticks=False)
    bakong.state.faults = Faults(list_status=403)
    young = [await create(gw, receiver) for _ in range(3)]
    old = [await create(gw, receiver) for _ in range(24)]
    ending = [await create(gw, receiver, timeoutSeconds=3) for _ in range(3)]
    await backdate(gw, old + ending, minutes=10)
    gw.service.start_ticks()
    await asyncio.sleep(2.0)  # the first round of 30 calls, at 20 a second
    before = dict(bakong.state.single_checks)
    start = time.monotonic()
    hooks = await receiver.wait_for(3, timeout=5)
    assert {h.json()["jobId"] for h in hooks} == {j["jobId"] for j in ending}
    assert {h.json()["reason"] for h in hooks} == {"not_paid"}, "each final check was made"
    await asyncio.sleep(5.0 - (time.monotonic() - start))
    checks = {
        j["md5"]: bakong.state.single_checks[j["md5"]] - before.get(j["md5"], 0)
        for j in young + old
    }
    # At 0.2 s a young md5 could be asked 25 times in 5 s; asked alike, 3 or 4.
    assert min(checks[j["md5"]] for j in young) >= 10, checks
    assert min(checks[j["md5"]] for j in old) >= 1, "no md5 starves"
    assert max(checks[j["md5"]] for j in old) <= 4, "older md5s at a slower cadence"
    assert len(check_times(bakong, since=start)) <= 20 + 20 * 5.5, "within the rate"


async def test_the_list_endpoint_refused_is_shown_and_asked_again_now_and_then(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(checker_module, "LIST_RETRY_S", 1.0, raising=False)
    gw = await make_gateway()
    bakong.state.faults = Faults(list_status=403)
    created = await create(gw, receiver)
    for _ in range(100):
        if bakong.state.single_checks[created["md5"]] >= 2:
            break
        await asyncio.sleep(0.05)
    assert bakong.state.single_checks[created["md5"]] >= 2, "checked one by one"
    for path in ("/api/v1/stats", "/ready"):
        body = await settled(gw, path)
        assert body["bakong"]["checks"]["mode"] == "single", (path, body["bakong"])

    bakong.state.faults = Faults()
    lists = bakong.state.calls["check_transaction_by_md5_list"]
    await asyncio.sleep(1.6)
    assert bakong.state.calls["check_transaction_by_md5_list"] > lists + 2, "lists again"
    singles = bakong.state.single_checks[created["md5"]]
    await asyncio.sleep(0.5)
    assert bakong.state.single_checks[created["md5"]] == singles, "no more one by one"
    for path in ("/api/v1/stats", "/ready"):
        body = await settled(gw, path)
        assert body["bakong"]["checks"]["mode"] == "list", (path, body["bakong"])


async def settled(gw: Gateway, path: str) -> dict[str, Any]:
    """The body of a GET once the figures are read (/api/v1/stats answers 503 until then)."""
    for _ in range(60):
        status, body = await gw.get(path)
        if status == 200:
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} answered {status}: {body}")
