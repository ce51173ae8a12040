"""The Bakong client as production needs it: through a real HTTP proxy, and what it says when
Bakong refuses every call (as it refuses hosts outside Cambodia)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from khqr_gateway.metrics import REGISTRY
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5, secret


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def proxy() -> Iterator[tuple[str, str]]:
    """proxy.py on loopback with a password: (its URL with the password, the password)."""
    port = free_port()
    password = secrets.token_urlsafe(12)
    command = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port)]
    command += ["--basic-auth", f"shop:{password}", "--num-workers", "1", "--num-acceptors", "1"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None, "proxy.py exited"
                assert time.monotonic() < deadline, "proxy.py did not start"
                time.sleep(0.1)
        yield f"http://shop:{password}@127.0.0.1:{port}", password
    finally:
        process.terminate()
        process.wait(10)


def bakong_calls(bakong: SimulatedBakong) -> int:
    return sum(bakong.state.calls.values())


async def test_every_bakong_call_goes_through_the_proxy(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    proxy: tuple[str, str],
) -> None:
    url, password = proxy
    secret(password)
    gw = await make_gateway(bakong_proxy_url=url)
    status, created = await gw.post(
        "/api/v1/transaction/email",
        {"md5": random_md5(), "webhookUrl": receiver.url, "email": "shop@example.com"},
    )
    assert status == 201, created
    await asyncio.sleep(0.5)  # a few checks, not found
    bakong.pay(random_md5())  # not ours: the checks go on
    others = [random_md5() for _ in range(3)]
    for md5 in others:
        status, _ = await gw.post("/api/v1/transactions", {"md5": md5, "webhookUrl": receiver.url})
        assert status == 201
        bakong.pay(md5)
    await receiver.wait_for(3)
    assert bakong.state.calls["renew_token"] == 1
    assert bakong.state.calls["check_transaction_by_md5_list"] >= 2
    assert bakong.state.proxied == bakong_calls(bakong), "a call went around the proxy"


async def test_a_proxy_refusing_the_password_times_nothing_out_and_leaks_nothing(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    proxy: tuple[str, str],
) -> None:
    url, _ = proxy
    wrong = secret(secrets.token_urlsafe(12))
    gw = await make_gateway(bakong_proxy_url=url.replace(url.split(":")[2].split("@")[0], wrong))
    status, created = await gw.post(
        "/api/v1/transactions",
        {"md5": random_md5(), "webhookUrl": receiver.url, "timeoutSeconds": 1},
    )
    assert status == 201
    await asyncio.sleep(1.5)  # past the deadline, within the grace
    _, body = await gw.get(f"/api/v1/transactions/{created['jobId']}")
    assert body["status"] == "pending", "no answer from Bakong is no evidence"
    assert bakong_calls(bakong) == 0
    _, stats = await gw.get("/api/v1/stats")
    assert stats["bakong"]["byError"].get("proxy_refused", 0) >= 1


async def test_bakong_refusing_every_call_is_named_in_ready_once_per_episode(
    gateway: Gateway,
    bakong: SimulatedBakong,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway.service.bakong.refusals.after_s = 0.6  # a minute in production
    bakong.state.faults.geo_block = True
    status, _ = await gateway.post(
        "/api/v1/transactions", {"md5": random_md5(), "webhookUrl": receiver.url}
    )
    assert status == 201
    _, ready = await gateway.get("/ready")
    assert ready["status"] == "ok", "a refusal or two is not yet a pattern"
    await asyncio.sleep(1.2)
    _, ready = await gateway.get("/ready")
    assert ready["status"] == "degraded"
    assert "BAKONG_PROXY_URL" in ready["bakong"]["problem"]
    assert REGISTRY.get_sample_value("khqr_bakong_refusing_everything") == 1
    await asyncio.sleep(0.5)
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "BAKONG_PROXY_URL" in r.message
    ]
    assert len(warnings) == 1

    bakong.state.faults.geo_block = False
    deadline = time.monotonic() + 10
    while (await gateway.get("/ready"))[1]["status"] != "ok":
        assert time.monotonic() < deadline, "never ready again"
        await asyncio.sleep(0.1)
    assert REGISTRY.get_sample_value("khqr_bakong_refusing_everything") == 0
