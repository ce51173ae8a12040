"""The delivery tick: first attempts before retries, backlogs, shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from khqr_gateway.deliveries import deliverer as deliverer_module
from khqr_gateway.deliveries.model import Lane
from tests.conftest import GatewayFactory, Receiver, SimulatedBakong
from tests.deliveries.test_sender import paid


async def test_a_failing_retry_lane_does_not_strand_claimed_first_attempts(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await make_gateway(run_ticks=False)
    service = gw.service
    service.poller.on_deliveries = None  # this test runs the delivery tick itself
    created = await paid(gw, bakong, receiver.url)
    await asyncio.sleep(0.3)  # its first poll comes due
    await service.poller.tick()  # records success and queues its first attempt
    assert (await service.lanes.sizes())[Lane.FIRST] == 1
    await service.lanes.add(["msg_fake"], 0, Lane.RETRY)
    real = deliverer_module.store.load_due

    async def flaky(pool: Any, ids: Any) -> Any:
        if "msg_fake" in ids:
            raise ConnectionError("postgres blip")
        return await real(pool, ids)

    monkeypatch.setattr(deliverer_module.store, "load_due", flaky)
    with pytest.raises(ConnectionError):
        await service.deliverer.tick()
    [hook] = await receiver.wait_for(1, timeout=5)
    assert hook.json()["jobId"] == created["jobId"]


async def test_a_backlog_drains_without_waiting_for_ticks(
    make_gateway: GatewayFactory, bakong: SimulatedBakong, receiver: Receiver
) -> None:
    """More due than one claim may take: freed room is claimed again at once, so the tick
    period does not cap how many webhooks go out a second."""
    gw = await make_gateway(run_ticks=False)
    service = gw.service
    service.poller.on_deliveries = None  # only the one tick below may start sends
    service.deliverer.max_in_flight = 4
    service.deliverer.receivers.per_host = 2
    for _ in range(12):
        await paid(gw, bakong, receiver.url)
    await asyncio.sleep(0.3)  # their first polls come due
    await service.poller.tick()
    assert (await service.lanes.sizes())[Lane.FIRST] == 12
    await service.deliverer.tick()  # one tick: room for 4
    hooks = await receiver.wait_for(12, timeout=5)
    assert len({hook.headers["webhook-id"] for hook in hooks}) == 12


async def test_shutdown_waits_for_a_claim_under_way_rather_than_handing_it_back(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim still loading when shutdown starts: its sends are waited for and recorded,
    not handed back while they go out (another process would send them a second time)."""
    gw = await make_gateway(run_ticks=False)
    service = gw.service
    service.poller.on_deliveries = None  # this test runs the delivery tick itself
    created = await paid(gw, bakong, receiver.url)
    await asyncio.sleep(0.3)  # its first poll comes due
    await service.poller.tick()
    assert (await service.lanes.sizes())[Lane.FIRST] == 1
    loading, go_on = asyncio.Event(), asyncio.Event()
    real = deliverer_module.store.load_due

    async def slow(pool: Any, ids: Any) -> Any:
        loading.set()
        await go_on.wait()
        return await real(pool, ids)

    monkeypatch.setattr(deliverer_module.store, "load_due", slow)
    tick = asyncio.create_task(service.deliverer.tick())
    await loading.wait()
    drain = asyncio.create_task(service.deliverer.drain(5))
    await asyncio.sleep(0.2)
    go_on.set()
    await drain
    await tick
    [hook] = await receiver.wait_for(1)
    assert hook.json()["jobId"] == created["jobId"]
    assert (await service.lanes.sizes())[Lane.FIRST] == 0, "handed back: it would be sent again"
