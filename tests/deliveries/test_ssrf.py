"""SSRF guard: address classification, the policy per environment, refusal at creation,
and the block at send time (tested against loopback only: no traffic leaves this machine)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from ipaddress import ip_address
from typing import Any

import asyncpg
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from khqr_gateway.config import AppEnv, Settings
from khqr_gateway.deliveries.model import DueDelivery
from khqr_gateway.deliveries.sender import Sender
from khqr_gateway.deliveries.ssrf import (
    AddressPolicy,
    Blocked,
    GuardedConnector,
    GuardedResolver,
    Kind,
    classify,
    classify_host,
)
from tests.conftest import Gateway, GatewayFactory, Receiver, SimulatedBakong, random_md5

PRODUCTION = AddressPolicy.for_settings(Settings(app_env=AppEnv.PRODUCTION))
DEVELOPMENT = AddressPolicy.for_settings(Settings(app_env=AppEnv.DEVELOPMENT))


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", Kind.LOOPBACK),
        ("127.255.0.9", Kind.LOOPBACK),
        ("10.0.0.1", Kind.PRIVATE),
        ("172.16.5.4", Kind.PRIVATE),
        ("192.168.1.1", Kind.PRIVATE),
        ("169.254.169.254", Kind.METADATA),
        ("169.254.10.1", Kind.LINK_LOCAL),
        ("100.64.0.1", Kind.CGNAT),
        ("100.100.100.200", Kind.METADATA),
        ("0.0.0.0", Kind.UNSPECIFIED),
        ("224.0.0.251", Kind.MULTICAST),
        ("255.255.255.255", Kind.RESERVED),
        ("198.18.0.1", Kind.RESERVED),
        ("::1", Kind.LOOPBACK),
        ("::", Kind.UNSPECIFIED),
        ("fc00::1", Kind.PRIVATE),
        ("fd12:3456::1", Kind.PRIVATE),
        ("fe80::1", Kind.LINK_LOCAL),
        ("fe80::1%eth0", Kind.LINK_LOCAL),
        ("ff02::1", Kind.MULTICAST),
        ("fd00:ec2::254", Kind.METADATA),
        ("2001:db8::1", Kind.RESERVED),
        ("::7f00:1", Kind.RESERVED),  # IPv4-compatible, deprecated
        ("64:ff9b:1::a00:1", Kind.RESERVED),  # local-use NAT64
        # IPv6 forms that lead to an IPv4 address are judged by that address.
        ("::ffff:127.0.0.1", Kind.LOOPBACK),
        ("::ffff:10.1.2.3", Kind.PRIVATE),
        ("::ffff:169.254.169.254", Kind.METADATA),
        ("64:ff9b::7f00:1", Kind.LOOPBACK),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", Kind.METADATA),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::1", Kind.LOOPBACK),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", Kind.PRIVATE),  # 6to4 of 192.168.1.1
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", Kind.LOOPBACK),  # Teredo client 127.0.0.1
        # Teredo: a metadata server behind a private client (10.0.0.1) is metadata.
        ("2001:0:a9fe:a9fe::f5ff:fffe", Kind.METADATA),
        ("fd20:ce::254", Kind.METADATA),  # GCP over IPv6
    ],
)
def test_special_addresses_are_classified(address: str, kind: Kind) -> None:
    assert classify(ip_address(address.split("%")[0])) is kind
    assert classify_host(address) is kind


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.128.0.1",  # just past CGNAT
        "172.32.0.1",  # just past 172.16/12
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo client 8.8.8.8
    ],
)
def test_public_addresses_are_not_special(address: str) -> None:
    assert classify(ip_address(address)) is None
    host = f"[{address}]" if ":" in address else address
    assert PRODUCTION.check_url(f"https://{host}/hook") is None


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("localhost", Kind.LOOPBACK),
        ("LocalHost.", Kind.LOOPBACK),
        ("api.localhost", Kind.LOOPBACK),
        ("metadata.google.internal", Kind.METADATA),
        ("host.docker.internal", Kind.PRIVATE),
        ("printer.local", Kind.PRIVATE),
        ("receiver", Kind.PRIVATE),  # no dot: resolved by the local network's search domains
        ("2130706433", Kind.LOOPBACK),  # 127.0.0.1 as one number
        ("0x7f.0.0.1", Kind.LOOPBACK),
        ("127.1", Kind.LOOPBACK),
        ("[::1]", Kind.LOOPBACK),
        ("example.com", None),
        ("hooks.shop.com.kh", None),
        ("cafe.be", None),  # looks hexadecimal, is a name
    ],
)
def test_hosts_known_without_dns(host: str, kind: Kind | None) -> None:
    assert classify_host(host) is kind


def test_policy_per_environment() -> None:
    stage = AddressPolicy.for_settings(Settings(app_env=AppEnv.STAGE))
    test = AddressPolicy.for_settings(Settings(app_env=AppEnv.TEST))
    off = AddressPolicy.for_settings(
        Settings(app_env=AppEnv.PRODUCTION, allow_private_webhook_urls=True)
    )
    loopback, private = "http://127.0.0.1:8080/hook", "http://10.0.0.1/hook"
    assert PRODUCTION.check_url(loopback) and PRODUCTION.check_url(private)
    assert stage.check_url(loopback) and stage.check_url(private)
    metadata = "http://169.254.169.254/latest/meta-data/"
    for relaxed in (DEVELOPMENT, test):
        assert relaxed.check_url(loopback) is None and relaxed.check_url(private) is None
        assert relaxed.check_url("http://receiver:8080/hook") is None
        assert relaxed.check_url("http://100.101.102.103/hook") is None  # Tailscale
        assert relaxed.check_url(metadata)
        for other in ("169.254.170.2", "[fd20:ce::254]", "[::a9fe:a9fe]", "[fe80::1]"):
            assert relaxed.check_url(f"http://{other}/"), other
    assert off.off
    assert off.check_url(private) is None and off.check_url("http://169.254.169.254/") is None


def test_refusal_names_the_host_and_the_way_out() -> None:
    message = PRODUCTION.check_url("http://169.254.169.254/latest/meta-data/")
    assert message is not None
    assert "169.254.169.254" in message and "cloud metadata" in message
    assert "ALLOW_PRIVATE_WEBHOOK_URLS" in message


# Creation: 422 on webhookUrl


@pytest.fixture
async def production(make_gateway: GatewayFactory) -> Gateway:
    # No ticks: nothing is polled or sent, whatever URL a test creates.
    return await make_gateway(
        app_env=AppEnv.PRODUCTION, allow_private_webhook_urls=False, run_ticks=False
    )


async def create(gw: Gateway, url: str) -> tuple[int, Any]:
    return await gw.post("/api/v1/transactions", {"md5": random_md5(), "webhookUrl": url})


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[64:ff9b::7f00:1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://127.0.0.1:8080/hook",
        "http://2130706433/hook",
        "http://localhost:3000/hook",
        "https://metadata.google.internal/computeMetadata/v1/",
        "http://[fe80::1%25eth0]/hook",
    ],
)
async def test_production_refuses_internal_urls_with_422(production: Gateway, url: str) -> None:
    status, body = await create(production, url)
    assert status == 422, body
    [detail] = body["error"]["details"]
    assert detail["field"] == "webhookUrl"
    assert "not a public address" in detail["message"]


# Hosts where urlsplit, which creation used, saw no IP (some were refused only by luck: no
# dot, or .internal) while aiohttp (yarl: NFKC and IDNA) connects to one; and backslashes
# in the authority, which aiohttp refuses on every attempt.
DISGUISED = [
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # fullwidth 127.0.0.1
    "http://\u2460\u2461\u2466.0.0.1/",  # circled 127
    "http://127\u30020\u30020\u30021/hook",  # ideographic full stops
    "http://\u2460\u2465\u2468.\u2461\u2464\u2463.\u2460\u2465\u2468.\u2461\u2464\u2463/",
    "http://[::ffff:\uff11\uff12\uff17.0.0.1]/hook",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:3000/hook",  # localhost
    "http://\u24dcetadata.google.internal/",
    "http://127.0.0.1\\@example.com/",
    "http://example.com\\@127.0.0.1/",
]


async def created_for(gw: Gateway, md5: str) -> list[Any]:
    status, page = await gw.get(f"/api/v1/transactions?md5={md5}")
    assert status == 200, page
    data: list[Any] = page["data"]
    return data


@pytest.mark.parametrize("url", DISGUISED)
async def test_production_refuses_disguised_internal_urls(production: Gateway, url: str) -> None:
    md5 = random_md5()
    status, body = await production.post("/api/v1/transactions", {"md5": md5, "webhookUrl": url})
    assert status == 422, body
    assert set(body["error"]) == {"code", "message", "details"}
    [detail] = body["error"]["details"]
    assert detail["field"] == "webhookUrl"
    assert await created_for(production, md5) == []


def test_creation_judges_the_host_aiohttp_connects_to() -> None:
    assert "127.0.0.1 is not a public address" in (
        PRODUCTION.check_url("http://\uff11\uff12\uff17.0.0.1/") or ""
    )
    assert PRODUCTION.check_url("https://b\u00fccher.example/hook") is None
    assert DEVELOPMENT.check_url("http://\u2460\u2461\u2466.0.0.1:3000/") is None


async def test_unicode_names_and_backslashes_in_paths_still_work(production: Gateway) -> None:
    # A real IDN name, and a backslash aiohttp sends percent-encoded in the path.
    for url in ("https://b\u00fccher.example/hook", "https://shop.example/a\\b"):
        status, body = await create(production, url)
        assert status == 201, (url, body)


@pytest.mark.parametrize(
    "url", ["https://93.184.216.34/hook", "https://[2606:4700:4700::1111]/hook"]
)
async def test_production_accepts_public_literal_ips(production: Gateway, url: str) -> None:
    status, body = await create(production, url)
    assert status == 201, body


async def test_allow_private_webhook_urls_accepts_them(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        app_env=AppEnv.PRODUCTION, allow_private_webhook_urls=True, run_ticks=False
    )
    for url in ("http://10.0.0.1/hook", "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/"):
        status, body = await create(gw, url)
        assert status == 201, (url, body)


async def test_development_allows_local_receivers_but_not_cloud_metadata(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        app_env=AppEnv.DEVELOPMENT, allow_private_webhook_urls=False, run_ticks=False
    )
    assert (await create(gw, "http://localhost:3000/hook"))[0] == 201
    assert (await create(gw, "http://127.0.0.1:3000/hook"))[0] == 201
    assert (await create(gw, "http://192.168.1.10/hook"))[0] == 201
    assert (await create(gw, "http://shop-api:8000/hook"))[0] == 201  # a compose service
    assert (await create(gw, "http://169.254.169.254/latest/meta-data/"))[0] == 422
    assert (await create(gw, "http://metadata.google.internal/"))[0] == 422


# Send time: the address actually connected to


class FixedResolver(AbstractResolver):
    """DNS that answers every name with the given addresses (a rebinding attacker's DNS)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


def due(url: str) -> DueDelivery:
    return DueDelivery(
        id="msg_ssrftest",
        transaction_id=uuid.uuid4(),
        md5=random_md5(),
        url=url,
        payload=b'{"status":"success"}',
        attempt_count=0,
        series_attempts=0,
        next_attempt_at=None,
        app_id="app_default",
    )


def sender(policy: AddressPolicy, resolver: AbstractResolver) -> Sender:
    return Sender(
        secrets=(),
        timeout_s=2.0,
        connector_factory=lambda: GuardedConnector(policy, resolver=resolver),
    )


async def test_a_name_that_resolves_to_loopback_is_blocked_at_send_time(
    production: Gateway, receiver: Receiver
) -> None:
    # The name passed creation; at send time DNS says 127.0.0.1 (rebinding).
    port = receiver.url.split(":")[2].split("/")[0]
    url = f"http://hooks.rebind.example:{port}/hook"
    guarded = sender(PRODUCTION, FixedResolver("127.0.0.1"))
    allowed = sender(DEVELOPMENT, FixedResolver("127.0.0.1"))
    try:
        blocked = await guarded.send(due(url))
        assert blocked.error_kind == "ssrf-blocked"
        assert blocked.status is None
        assert "127.0.0.1" in (blocked.error_message or "")
        assert receiver.received == []
        sent = await allowed.send(due(url))  # the same name reaches the receiver when allowed
        assert sent.status == 200 and len(receiver.received) == 1
    finally:
        await guarded.close()
        await allowed.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"])
async def test_literal_loopback_is_blocked_at_send_time(
    production: Gateway, receiver: Receiver, host: str
) -> None:
    # aiohttp does not resolve IP literals: the connector checks them itself.
    port = receiver.url.split(":")[2].split("/")[0]
    result = await production.service.deliverer.sender.send(due(f"http://{host}:{port}/hook"))
    assert result.error_kind == "ssrf-blocked"
    assert receiver.received == []


async def test_resolver_keeps_only_allowed_addresses() -> None:
    resolver = GuardedResolver(DEVELOPMENT, FixedResolver("169.254.169.254", "127.0.0.1", "::1"))
    kept = await resolver.resolve("rebind.example", 80)
    assert [r["host"] for r in kept] == ["127.0.0.1", "::1"]
    with pytest.raises(Blocked, match=r"resolves only to refused addresses: 127\.0\.0\.1"):
        await GuardedResolver(PRODUCTION, FixedResolver("127.0.0.1")).resolve("x.example", 80)


async def test_blocked_attempt_is_stored_and_reported(
    make_gateway: GatewayFactory,
    bakong: SimulatedBakong,
    receiver: Receiver,
    pg: asyncpg.Connection,
) -> None:
    """A webhook URL that became internal after creation is never called, in production."""
    # Created while the guard was off (the test settings allow private URLs), then sent by
    # a production gateway: what its connector refuses is never called.
    creator = await make_gateway(run_ticks=False)
    sender = await make_gateway(app_env=AppEnv.PRODUCTION, allow_private_webhook_urls=False)
    port = receiver.url.split(":")[2].split("/")[0]
    status, created = await create(creator, f"http://localhost:{port}/hook")
    assert status == 201, created
    bakong.pay(created["md5"])
    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:
        row = await pg.fetchrow(
            "select a.error_kind, a.error_message, d.id from delivery_attempts a"
            " join deliveries d on d.id = a.delivery_id where d.transaction_id = $1",
            uuid.UUID(created["jobId"]),
        )
        if row:
            break
        await asyncio.sleep(0.05)
    assert row is not None, "no attempt was stored"
    assert row["error_kind"] == "ssrf-blocked"
    assert "localhost" in row["error_message"]
    _, delivery = await sender.get(f"/api/v1/deliveries/{row['id']}")
    assert delivery["attempts"][0]["errorKind"] == "ssrf-blocked"
    assert delivery["attempts"][0]["statusCode"] is None
    assert receiver.received == []
