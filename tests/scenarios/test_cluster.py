"""On a Redis Cluster (`make test-cluster`: 6 local redis-server nodes, 3 masters and 3
replicas): the gateway's scripts and pub/sub work there, and a master killed mid-work
loses nothing once its replica has taken over."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import asyncpg
import pytest
from redis.asyncio import RedisCluster

from khqr_gateway.infra.keys import keys
from tests import conftest
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5

pytestmark = pytest.mark.skipif(
    not conftest.REDIS_CLUSTER, reason="runs on the local Redis Cluster: make test-cluster"
)

PENDING = 500


async def test_the_gateway_talks_to_the_cluster(gateway: Gateway, namespace: str) -> None:
    redis = gateway.service.redis
    assert isinstance(redis, RedisCluster)
    slots = {await redis.cluster_keyslot(k) for k in keys(namespace).values()}
    assert len(slots) == 1, "every key shares the namespace's hash tag, so one slot"
    assert len(redis.get_primaries()) == 3, "3 masters (each with its replica)"


async def create(gw: Gateway, url: str, count: int) -> dict[str, str]:
    """`count` new transactions: jobId by md5."""
    made: dict[str, str] = {}
    for start in range(0, count, 50):
        answers = await asyncio.gather(
            *(
                gw.post("/api/v1/transactions", {"md5": random_md5(), "webhookUrl": url})
                for _ in range(min(50, count - start))
            )
        )
        for status, body in answers:
            assert status == 201, body
            made[body["md5"]] = body["jobId"]
    return made


async def test_a_master_killed_mid_work_loses_nothing_and_sends_each_transition_once(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    namespace: str,
    pg: asyncpg.Connection,
) -> None:
    cluster = conftest.CLUSTER
    assert cluster is not None
    gw = await make_gateway(poll_interval_s=0.5, bakong_max_rps=200)
    receiver.delay_s = 0.2  # webhooks stay in flight a while
    made = await create(gw, receiver.url, PENDING)
    md5s = list(made)
    for md5 in md5s[: PENDING // 2]:
        bakong.pay(md5)
    await receiver.wait_for(20, timeout=30)  # webhooks are being sent

    master = cluster.master_of(keys(namespace)["poll"])
    cluster.kill(master)
    for md5 in md5s[PENDING // 2 :]:  # paid while the schedules' master is gone
        bakong.pay(md5)
    try:
        await asyncio.to_thread(cluster.wait_taken_over, keys(namespace)["poll"], master)
        deadline = time.monotonic() + 90
        while len({r.json()["md5"] for r in receiver.received}) < PENDING:
            assert time.monotonic() < deadline, (
                f"{len({r.json()['md5'] for r in receiver.received})} of {PENDING} reported"
            )
            await asyncio.sleep(0.2)
    finally:
        cluster.start_node(master)  # it comes back as a replica, for the tests after this
        await asyncio.to_thread(cluster.wait_ok)

    ids: dict[str, set[str]] = defaultdict(set)
    for hook in receiver.received:
        ids[hook.json()["md5"]].add(hook.headers["webhook-id"])
    assert set(ids) == set(md5s)
    assert all(len(v) == 1 for v in ids.values()), "a transition has one webhook-id"
    rows = await pg.fetch(
        "select t.status, count(d.id) as deliveries from transactions t"
        " left join deliveries d on d.transaction_id = t.id group by t.id, t.status"
    )
    assert {(r["status"], r["deliveries"]) for r in rows} == {("success", 1)}
    deadline = time.monotonic() + 30
    while await pg.fetchval("select count(*) from deliveries where status <> 'delivered'"):
        assert time.monotonic() < deadline, "every webhook is stored as delivered"
        await asyncio.sleep(0.2)
