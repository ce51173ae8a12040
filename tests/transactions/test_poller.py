"""The state machine and webhook body (pure); the poller's batching against the simulated Bakong."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from uuid import UUID, uuid4

import asyncpg
import orjson
import pytest

from khqr_gateway.bakong.model import CheckKind, CheckResult, ErrorKind
from khqr_gateway.infra.db import write_isolated
from khqr_gateway.transactions.model import (
    Expected,
    Outcome,
    PollItem,
    Status,
    Transition,
    decide,
    mismatches,
    transition,
    webhook_body,
)
from khqr_gateway.transactions.store import record_transitions
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
PAID = {"amount": 100, "currency": "USD", "toAccountId": "shop@aclb", "hash": "ab" * 32}


def item(
    deadline: datetime = NOW + timedelta(minutes=5), expected: Expected | None = None
) -> PollItem:
    return PollItem(uuid4(), random_md5(), deadline, None, expected)


def test_paid_is_success() -> None:
    out = decide(item(), CheckResult(CheckKind.PAID, PAID), NOW, grace_s=60)
    assert out == Outcome(Status.SUCCESS, None, PAID)


def test_failed_is_failed_even_before_deadline() -> None:
    out = decide(item(), CheckResult(CheckKind.FAILED), NOW, grace_s=60)
    assert out.status is Status.FAILED


def test_not_found_before_deadline_stays_pending() -> None:
    assert (
        decide(item(), CheckResult(CheckKind.NOT_FOUND), NOW, grace_s=60).status is Status.PENDING
    )


def test_not_found_at_the_final_check_times_out() -> None:
    out = decide(item(deadline=NOW), CheckResult(CheckKind.NOT_FOUND), NOW, grace_s=60)
    assert out == Outcome(Status.TIMEOUT, "not_paid")


def test_no_answer_is_never_evidence_within_grace() -> None:
    late = item(deadline=NOW - timedelta(seconds=59))
    out = decide(late, CheckResult(CheckKind.ERROR, error=ErrorKind.SERVER_ERROR), NOW, grace_s=60)
    assert out.status is Status.PENDING


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ErrorKind.SERVER_ERROR, "bakong_unreachable"),
        (ErrorKind.TIMEOUT, "bakong_unreachable"),
        (ErrorKind.UNAUTHORIZED, "bakong_unauthorized"),
        (ErrorKind.NO_TOKEN, "bakong_unauthorized"),
    ],
)
def test_no_answer_after_grace_times_out_saying_why(error: ErrorKind, reason: str) -> None:
    late = item(deadline=NOW - timedelta(seconds=61))
    out = decide(late, CheckResult(CheckKind.ERROR, error=error), NOW, grace_s=60)
    assert out == Outcome(Status.TIMEOUT, reason)


def test_paid_after_deadline_is_still_success() -> None:
    late = item(deadline=NOW - timedelta(hours=1))
    assert decide(late, CheckResult(CheckKind.PAID, PAID), NOW, grace_s=60).status is Status.SUCCESS


def test_mismatch_names_each_differing_field() -> None:
    expected = Expected(Decimal("100.00"), "KHR", "other@aclb")
    out = decide(item(expected=expected), CheckResult(CheckKind.PAID, PAID), NOW, grace_s=60)
    assert out.status is Status.MISMATCH
    assert out.reason is not None
    assert "currency" in out.reason and "toAccountId" in out.reason
    assert "amount" not in out.reason, "100 and 100.00 are the same amount"
    assert out.data == PAID


def test_underpayment_is_a_mismatch() -> None:
    found = mismatches(Expected(Decimal("100"), None, None), {**PAID, "amount": 1})
    assert found == ["amount: expected 100, got 1"]


def test_matching_expectations_are_success() -> None:
    expected = Expected(Decimal("100"), "usd", "SHOP@aclb")
    out = decide(item(expected=expected), CheckResult(CheckKind.PAID, PAID), NOW, grace_s=60)
    assert out.status is Status.SUCCESS


def test_webhook_body_is_the_reference_services_shape() -> None:
    job = uuid4()
    body = orjson.loads(
        webhook_body(job_id=job, md5="a" * 32, outcome=Outcome(Status.SUCCESS, None, PAID))
    )
    assert body == {"status": "success", "data": PAID, "md5": "a" * 32, "jobId": str(job)}
    timeout = orjson.loads(
        webhook_body(
            job_id=job, md5="a" * 32, outcome=Outcome(Status.TIMEOUT, "not_paid"), metadata={"o": 1}
        )
    )
    assert timeout == {
        "status": "timeout",
        "data": None,
        "md5": "a" * 32,
        "jobId": str(job),
        "reason": "not_paid",
        "metadata": {"o": 1},
    }


def test_cancelled_gets_no_delivery() -> None:
    t = transition(item(), Outcome(Status.CANCELLED, "cancelled_by_request"))
    assert t.delivery_id is None and t.payload is None
    t = transition(item(), Outcome(Status.TIMEOUT, "not_paid"))
    assert t.delivery_id is not None and t.delivery_id.startswith("msg_")


async def test_checks_go_out_in_batches_of_at_most_50(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    md5s = [random_md5() for _ in range(120)]
    for md5 in md5s:
        status, _ = await gateway.post(
            "/api/v1/transactions", {"md5": md5, "webhookUrl": receiver.url}
        )
        assert status == 201
    await asyncio.sleep(1.0)
    calls = bakong.state.calls["check_transaction_by_md5_list"]
    checks = sum(bakong.state.checks[m] for m in md5s)
    assert checks >= 120, "every md5 was checked"
    assert calls >= 3
    assert checks / calls > 20, f"batches were small: {checks} checks in {calls} calls"
    assert bakong.state.calls["check_transaction_by_md5"] == 0


async def test_list_endpoint_403_falls_back_to_per_md5_checks(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    bakong.state.faults.list_status = 403
    status, created = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success"
    assert bakong.state.single_checks[created["md5"]] >= 1


async def test_email_credential_gets_a_token_and_renews_it_on_401(
    make_gateway: object, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    gw = await make_gateway(bakong_token=None, bakong_email="merchant@example.com")  # type: ignore[operator]
    status, created = await gw.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    await asyncio.sleep(0.5)
    assert bakong.state.calls["renew_token"] == 1, "a token was fetched through the email once"
    # Bakong stops accepting that token: the next check gets 401 and must renew by itself.
    token = await gw.service.pool.fetchval("select token from credentials where email is not null")
    bakong.state.revoked.add(token)
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success"
    assert bakong.state.calls["renew_token"] == 2


async def test_a_member_that_is_not_a_job_id_does_not_stop_the_others(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    """Something else wrote into the poll schedule: the md5s claimed with it are still
    checked, and it is dropped."""
    service = gateway.service
    status, created = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    [due] = await service.polls.scores([created["jobId"]])
    assert due is not None
    await service.polls.add([("not-a-job-id", int(due))])  # claimed with it
    bakong.pay(created["md5"])
    [hook] = await receiver.wait_for(1)
    assert hook.json()["jobId"] == created["jobId"]
    assert await service.polls.scores(["not-a-job-id"]) == [None]


async def test_a_transition_postgres_refuses_stays_pending_alone(
    make_gateway: GatewayFactory, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    """Of one batch of transitions, a row Postgres refuses (here: a delivery id taken) leaves
    its transaction pending with no delivery; the others are recorded."""
    gw = await make_gateway(run_ticks=False)
    ids = []
    for _ in range(3):
        status, created = await gw.post(
            "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
        )
        assert status == 201
        ids.append(UUID(created["jobId"]))
    first, clash, third = (
        Transition(i, Status.SUCCESS, None, {"hash": "h"}, d, b"{}")
        for i, d in zip(ids, ["msg_same", "msg_same", "msg_other"], strict=True)
    )
    write = partial(record_transitions, gw.service.pool, window=gw.service.settings.late_window)
    happened, refused = await write_isolated(write, [first, clash, third])
    assert happened == [(first.id, "msg_same"), (third.id, "msg_other")]
    assert [t for t, _ in refused] == [clash]
    rows = await pg.fetch(
        "select t.id, t.status, d.id as delivery from transactions t"
        " left join deliveries d on d.transaction_id = t.id"
    )
    found = {r["id"]: (r["status"], r["delivery"]) for r in rows}
    assert found == {
        first.id: ("success", "msg_same"),
        clash.id: ("pending", None),
        third.id: ("success", "msg_other"),
    }
