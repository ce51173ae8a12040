"""The routes of rachhen/khqr-webhook: same paths, status codes and bodies."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from uuid import UUID

import asyncpg

from khqr_gateway.bakong.sandbox import make_token
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5
from tests.sse import Reader

KEY = "compat-api-key-0123456789"


async def post(gw: Gateway, path: str, body: Any) -> tuple[int, Any]:
    return await gw.post(f"/api/v1/transaction/{path}", body)


def is_uuid(value: str) -> bool:
    return str(uuid.UUID(value)) == value


async def test_create_with_token_answers_201_and_tracks(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    md5 = random_md5()
    status, body = await post(
        gateway, "token", {"md5": md5, "webhookUrl": receiver.url, "token": make_token()}
    )
    assert status == 201
    assert body == {"message": "Transaction created", "jobId": body["jobId"]}
    assert is_uuid(body["jobId"])

    bakong.pay(md5)
    [hook] = await receiver.wait_for(1)
    assert hook.json()["status"] == "success"
    assert hook.json()["jobId"] == body["jobId"]
    assert hook.json()["md5"] == md5


async def test_create_with_an_expired_token_is_401(gateway: Gateway, receiver: Receiver) -> None:
    expired = make_token(exp=int(time.time()) - 60)
    status, body = await post(
        gateway, "token", {"md5": random_md5(), "webhookUrl": receiver.url, "token": expired}
    )
    assert status == 401
    assert body["name"] == "UNAUTHORIZED"
    assert body["message"] == "Token is expired"
    assert body["error"]["code"] == "token_expired"


async def test_same_md5_while_pending_answers_201_with_the_same_job(
    gateway: Gateway, receiver: Receiver
) -> None:
    body = {"md5": random_md5(), "webhookUrl": receiver.url, "token": make_token()}
    first = await post(gateway, "token", body)
    second = await post(gateway, "token", body)
    assert first[0] == second[0] == 201
    assert first[1] == second[1]


async def test_a_paid_md5_posted_again_answers_201_with_its_job_and_no_second_notice(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    body = {"md5": random_md5(), "webhookUrl": receiver.url, "token": make_token()}
    status, first = await post(gateway, "token", body)
    assert status == 201
    bakong.pay(body["md5"])
    await receiver.wait_for(1)
    await gateway.wait_status(first["jobId"], "success")
    # That service answers 201 to every create, whatever the repeat asks for.
    again = await post(gateway, "token", {**body, "webhookUrl": receiver.url + "?again"})
    assert again == (201, first)
    await asyncio.sleep(1)
    assert len(receiver.received) == 1


async def test_a_token_sent_with_every_request_is_stored_once(
    make_gateway: GatewayFactory, receiver: Receiver, pg: asyncpg.Connection
) -> None:
    """That service's clients send the token with every create: once stored, it costs no
    write (each upsert of the one row bloated it and made the inserts wait on its lock)."""
    one, two = await make_gateway(), await make_gateway()
    token = make_token()
    for gw in (one, two):
        status, _ = await post(
            gw, "token", {"md5": random_md5(), "webhookUrl": receiver.url, "token": token}
        )
        assert status == 201
    query = "select id, xmin::text as version from credentials where token = $1"
    before = await pg.fetch(query, token)
    results = await asyncio.gather(
        *(
            post(gw, "token", {"md5": random_md5(), "webhookUrl": receiver.url, "token": token})
            for gw in (one, two) * 20
        )
    )
    assert [s for s, _ in results] == [201] * 40
    assert await pg.fetch(query, token) == before
    assert len(before) == 1
    jobs = [UUID(body["jobId"]) for _, body in results]
    ids = await pg.fetch(
        "select distinct credential_id from transactions where id = any($1::uuid[])", jobs
    )
    assert [r["credential_id"] for r in ids] == [before[0]["id"]]


async def test_create_with_email_renews_through_it_and_tracks(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    md5 = random_md5()
    status, body = await post(
        gateway, "email", {"md5": md5, "webhookUrl": receiver.url, "email": "shop@example.com"}
    )
    assert status == 201
    assert body == {"message": "Transaction created", "jobId": body["jobId"]}
    assert bakong.state.calls["renew_token"] == 1
    # The token is kept: a second transaction with the same email renews nothing.
    again = await post(
        gateway,
        "email",
        {"md5": random_md5(), "webhookUrl": receiver.url, "email": "SHOP@example.com"},
    )
    assert again[0] == 201
    assert bakong.state.calls["renew_token"] == 1

    bakong.pay(md5)
    hooks = await receiver.wait_for(1)
    assert hooks[0].json()["jobId"] == body["jobId"]


async def test_create_with_an_unregistered_email_is_401(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    bakong.state.registered_emails = set()
    status, body = await post(
        gateway, "email", {"md5": random_md5(), "webhookUrl": receiver.url, "email": "x@y.com"}
    )
    assert status == 401
    assert body["name"] == "UNAUTHORIZED"
    _, page = await gateway.get("/api/v1/transactions")
    assert page["data"] == [], "nothing is tracked"


async def test_invalid_bodies_are_422_with_every_field(gateway: Gateway) -> None:
    status, body = await post(gateway, "token", {"md5": "nope", "token": make_token()})
    assert status == 422
    assert body["name"] == "VALIDATION_ERROR"
    assert {d["field"] for d in body["details"]} == {"md5", "webhookUrl"}
    status, body = await post(
        gateway, "email", {"md5": random_md5(), "webhookUrl": "ftp://x", "email": "no"}
    )
    assert status == 422
    assert {d["field"] for d in body["details"]} == {"webhookUrl", "email"}


async def test_unknown_fields_are_ignored_as_there(gateway: Gateway, receiver: Receiver) -> None:
    status, _ = await post(
        gateway,
        "token",
        {"md5": random_md5(), "webhookUrl": receiver.url, "token": make_token(), "extra": 1},
    )
    assert status == 201


async def test_routes_need_the_api_key_as_bearer(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await make_gateway(api_keys=(KEY,))
    body = {"md5": random_md5(), "webhookUrl": receiver.url, "token": make_token()}
    anonymous = await gw.client.post("/api/v1/transaction/token", json=body)
    assert anonymous.status == 401
    wrong = await gw.client.post(
        "/api/v1/transaction/token", json=body, headers={"Authorization": "Bearer wrong"}
    )
    assert wrong.status == 401
    assert (await gw.post("/api/v1/transaction/token", body))[0] == 201
    md5 = await gw.client.get(f"/api/v1/transaction/{random_md5()}/md5")
    assert md5.status == 401


async def test_md5_paid_answers_bakong_data(gateway: Gateway, bakong: SimulatedBakong) -> None:
    md5 = random_md5()
    bakong.pay(md5, amount=5, currency="USD", toAccountId="shop@aclb")
    status, body = await gateway.get(f"/api/v1/transaction/{md5}/md5?token={make_token()}")
    assert status == 200
    assert body == bakong.state.payments[md5].data


async def test_md5_not_found_is_404_with_bakong_error_code(gateway: Gateway) -> None:
    status, body = await gateway.get(f"/api/v1/transaction/{random_md5()}/md5?token={make_token()}")
    assert status == 404
    assert body["name"] == "NOT_FOUND"
    assert body["code"] == 1
    assert body["message"] == "Transaction could not be found. Please check and try again."


async def test_md5_failed_is_417_with_bakong_error_code(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    md5 = random_md5()
    bakong.fail(md5)
    status, body = await gateway.get(f"/api/v1/transaction/{md5}/md5?token={make_token()}")
    assert status == 417
    assert body["name"] == "EXPECTATION_FAILED"
    assert body["code"] == 3


async def test_md5_with_email_or_the_default_credential(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    md5 = random_md5()
    bakong.pay(md5)
    by_email = await gateway.get(f"/api/v1/transaction/{md5}/md5?email=shop@example.com")
    assert by_email[0] == 200
    assert bakong.state.calls["renew_token"] == 1
    by_default = await gateway.get(f"/api/v1/transaction/{md5}/md5")
    assert by_default == by_email


async def test_md5_without_any_credential_is_400(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(bakong_token=None)
    status, body = await gw.get(f"/api/v1/transaction/{random_md5()}/md5")
    assert status == 400
    assert body["message"] == "Token or email is required"


async def test_md5_with_an_expired_token_or_bakong_down(
    gateway: Gateway, bakong: SimulatedBakong
) -> None:
    expired = make_token(exp=int(time.time()) - 60)
    status, body = await gateway.get(f"/api/v1/transaction/{random_md5()}/md5?token={expired}")
    assert status == 401
    bakong.state.faults.status = 500
    status, body = await gateway.get(f"/api/v1/transaction/{random_md5()}/md5?token={make_token()}")
    assert status == 502
    assert body["name"] == "BAD_GATEWAY"


async def track(gw: Gateway, job_id: str) -> Reader:
    resp = await gw.client.get(f"/api/v1/transaction/{job_id}/track", headers=gw.headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    return Reader(resp)


async def test_track_streams_pending_then_completed_and_ends(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    watcher = await make_gateway(run_ticks=False)
    await make_gateway()  # another process finds the payment
    md5 = random_md5()
    _, created = await post(
        watcher, "token", {"md5": md5, "webhookUrl": receiver.url, "token": make_token()}
    )
    stream = await track(watcher, created["jobId"])
    first = await stream.next()
    assert first is not None
    assert first.data == "PENDING"
    assert first.id is None
    bakong.pay(md5)
    assert [e.data for e in await stream.rest()] == ["COMPLETED"]


async def test_track_reports_failed_for_every_other_final_status(
    gateway: Gateway, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    failed, cancelled = random_md5(), random_md5()
    jobs = {}
    for md5 in (failed, cancelled):
        _, body = await post(
            gateway, "token", {"md5": md5, "webhookUrl": receiver.url, "token": make_token()}
        )
        jobs[md5] = body["jobId"]
    bakong.fail(failed)
    await gateway.wait_status(jobs[failed], "failed")
    await gateway.client.delete(f"/api/v1/transactions/{jobs[cancelled]}")
    for md5 in (failed, cancelled):
        raw = await (await gateway.client.get(f"/api/v1/transaction/{jobs[md5]}/track")).read()
        assert raw == b"data: FAILED\n\n"


async def test_track_of_an_unknown_job_is_404(gateway: Gateway) -> None:
    status, body = await gateway.get(f"/api/v1/transaction/{uuid.uuid4()}/track")
    assert status == 404
    assert body["name"] == "NOT_FOUND"


async def test_a_missing_api_key_on_the_compat_routes_is_answered_in_that_services_shape(
    make_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await make_gateway(api_keys=(KEY,))
    md5 = random_md5()
    body = {"md5": md5, "webhookUrl": receiver.url, "token": make_token()}
    for method, path in (
        ("POST", "/api/v1/transaction/token"),
        ("POST", "/api/v1/transaction/email"),
        ("GET", f"/api/v1/transaction/{md5}/md5"),
        ("GET", f"/api/v1/transaction/{uuid.uuid4()}/track"),
    ):
        resp = await gw.client.request(method, path, json=body if method == "POST" else None)
        answer = await resp.json()
        assert resp.status == 401, path
        assert answer["name"] == "UNAUTHORIZED", path
        assert answer["message"] == answer["error"]["message"], path
        assert answer["error"]["code"] == "unauthorized", path
    v1 = await (await gw.client.get("/api/v1/transactions")).json()
    assert "name" not in v1, "the v1 API keeps its own shape"
