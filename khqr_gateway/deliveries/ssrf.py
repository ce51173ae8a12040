"""SSRF guard: which addresses a webhook may reach, checked at creation and on connect.

A URL's literal IP (or an obviously internal name) is refused when the transaction is
created. At send time the connector checks every address it would connect to: a
resolver wrapper drops blocked addresses from each DNS answer, and literal IPs (which
aiohttp never resolves) are checked before connecting. What is checked is therefore what
is connected to, so a name that resolves somewhere harmless at creation and to
169.254.169.254 later (DNS rebinding) is still refused.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

IPAddress = IPv4Address | IPv6Address


class Blocked(Exception):
    """The address a webhook would go to is not allowed (SSRF guard)."""


class Kind(StrEnum):
    """A special-use address range a webhook may be kept from."""

    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    CGNAT = "carrier-grade NAT"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    RESERVED = "reserved"
    METADATA = "cloud metadata"


EVERY_KIND = frozenset(Kind)
# What development and test may reach: a receiver on this machine, the LAN, a compose
# service, a VPN such as Tailscale (CGNAT). Link-local stays refused (cloud credential
# endpoints such as AWS ECS's 169.254.170.2 live there), and so does reserved, where an
# address that does not parse is put (the guard fails closed).
LOCAL_KINDS = frozenset({Kind.LOOPBACK, Kind.PRIVATE, Kind.CGNAT})


def _v4(*rows: tuple[str, Kind]) -> tuple[tuple[IPv4Network, Kind], ...]:
    return tuple((IPv4Network(net), kind) for net, kind in rows)


def _v6(*rows: tuple[str, Kind]) -> tuple[tuple[IPv6Network, Kind], ...]:
    return tuple((IPv6Network(net), kind) for net, kind in rows)


# First match wins, so the metadata hosts come before the ranges that hold them.
_IPV4 = _v4(
    ("0.0.0.0/8", Kind.UNSPECIFIED),
    ("10.0.0.0/8", Kind.PRIVATE),
    ("100.100.100.200/32", Kind.METADATA),  # Alibaba Cloud
    ("100.64.0.0/10", Kind.CGNAT),
    ("127.0.0.0/8", Kind.LOOPBACK),
    ("169.254.169.254/32", Kind.METADATA),  # AWS, GCP, Azure, Oracle, DigitalOcean
    ("169.254.0.0/16", Kind.LINK_LOCAL),
    ("172.16.0.0/12", Kind.PRIVATE),
    ("192.0.0.0/24", Kind.RESERVED),  # IETF protocol assignments
    ("192.0.2.0/24", Kind.RESERVED),  # documentation
    ("192.88.99.0/24", Kind.RESERVED),  # retired 6to4 relays
    ("192.168.0.0/16", Kind.PRIVATE),
    ("198.18.0.0/15", Kind.RESERVED),  # benchmarking
    ("198.51.100.0/24", Kind.RESERVED),
    ("203.0.113.0/24", Kind.RESERVED),
    ("224.0.0.0/4", Kind.MULTICAST),
    ("240.0.0.0/4", Kind.RESERVED),  # includes the broadcast address
)
_IPV6 = _v6(
    ("::/128", Kind.UNSPECIFIED),
    ("::1/128", Kind.LOOPBACK),
    ("fd00:ec2::254/128", Kind.METADATA),  # AWS
    ("fd20:ce::254/128", Kind.METADATA),  # GCP
    ("fc00::/7", Kind.PRIVATE),  # unique local
    ("fe80::/10", Kind.LINK_LOCAL),
    ("fec0::/10", Kind.PRIVATE),  # site-local, the old unique local
    ("ff00::/8", Kind.MULTICAST),
    # Only 2000::/3 is global unicast: everything else left (IPv4-compatible ::a.b.c.d,
    # SIIT, local-use NAT64 64:ff9b:1::/48, discard 100::/64, unallocated) is reserved.
    ("2001:db8::/32", Kind.RESERVED),  # documentation
    ("3fff::/20", Kind.RESERVED),  # documentation
    ("2001:2::/48", Kind.RESERVED),  # benchmarking
)
_GLOBAL_UNICAST = IPv6Network("2000::/3")
_NAT64 = IPv6Network("64:ff9b::/96")

# Names that need no DNS answer to be known internal. A name without a dot is resolved
# through the search domains of the network the gateway runs in, never the internet.
_NAMES = {
    "localhost": Kind.LOOPBACK,
    "metadata": Kind.METADATA,
    "metadata.google.internal": Kind.METADATA,
    "metadata.goog": Kind.METADATA,
    "instance-data": Kind.METADATA,
    "instance-data.ec2.internal": Kind.METADATA,
}
_SUFFIXES = {
    ".localhost": Kind.LOOPBACK,
    ".internal": Kind.PRIVATE,  # the private-use TLD (host.docker.internal, *.ec2.internal)
    ".local": Kind.PRIVATE,  # mDNS
    ".home.arpa": Kind.PRIVATE,
}


def classify(address: IPAddress) -> Kind | None:
    """The special-use range `address` is in, or None for a public address.

    IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) are judged by
    the IPv4 address they lead to.
    """
    if isinstance(address, IPv4Address):
        return next((kind for net, kind in _IPV4 if address in net), None)
    embedded = _embedded_ipv4(address)
    if embedded:
        kinds = [k for k in map(classify, embedded) if k is not None]
        # Teredo carries two addresses: a metadata server behind a private client is metadata.
        return Kind.METADATA if Kind.METADATA in kinds else next(iter(kinds), None)
    found = next((kind for net, kind in _IPV6 if address in net), None)
    if found is None and address not in _GLOBAL_UNICAST:
        return Kind.RESERVED
    return found


def _embedded_ipv4(address: IPv6Address) -> list[IPv4Address]:
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        server, client = address.teredo
        return [client, server]
    return []


def parse_address(host: str) -> IPAddress | None:
    """The IP address `host` is written as (brackets, zone and legacy IPv4 forms too)."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ip_address(text)
    except ValueError:
        pass
    # 2130706433, 127.1, 0x7f.0.0.1: forms the C resolver reads as IPv4 addresses.
    if text and all(c in "0123456789abcdefx." for c in text.lower()):
        try:
            return IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def client_url(url: str) -> URL | None:
    """`url` as aiohttp's client parses it before connecting (yarl: the host NFKC-normalised
    and IDNA-encoded, so fullwidth or circled digits are ASCII ones), or None where the
    client could not send to it at all (a backslash in the authority, a bad port or label)."""
    try:
        return URL(url)
    except (ValueError, IndexError):  # IndexError: yarl 1.25 on "http://[]@"
        return None


def classify_host(host: str) -> Kind | None:
    """The range a URL host is known to be in without DNS: literal IPs and internal names."""
    name = host.lower().removesuffix(".")
    address = parse_address(name)
    if address is not None:
        return classify(address)
    if name in _NAMES:
        return _NAMES[name]
    if "." not in name:
        return Kind.PRIVATE
    return next((kind for suffix, kind in _SUFFIXES.items() if name.endswith(suffix)), None)


class Deployment(Protocol):
    """What the policy reads of the settings (a Protocol: config is above this module)."""

    @property
    def allow_private_webhook_urls(self) -> bool: ...
    @property
    def app_env(self) -> str: ...


# Deployments whose receivers may sit on the LAN (config.AppEnv values).
LOCAL_ENVS = frozenset({"development", "test"})


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which special-use ranges webhooks may reach; public addresses always may."""

    allowed: frozenset[Kind] = frozenset()

    @classmethod
    def for_settings(cls, settings: Deployment) -> AddressPolicy:
        """Off with ALLOW_PRIVATE_WEBHOOK_URLS. Development and test reach LOCAL_KINDS (a
        receiver on the LAN, a docker-compose service name), never cloud metadata, whose
        answer stored as a webhook response would hand out the host's credentials.
        Production and stage refuse every special-use range."""
        if settings.allow_private_webhook_urls:
            return cls(EVERY_KIND)
        if settings.app_env in LOCAL_ENVS:
            return cls(LOCAL_KINDS)
        return cls()

    @property
    def off(self) -> bool:
        return self.allowed == EVERY_KIND

    def refusal(self, kind: Kind | None) -> Kind | None:
        """`kind` when this policy refuses it, else None."""
        return kind if kind is not None and kind not in self.allowed else None

    def check_url(self, url: str) -> str | None:
        """Why a webhook URL is refused before any DNS lookup, or None when it may be tried."""
        if self.off:
            return None
        # The host aiohttp will connect to (what GuardedConnector.connect checks), not the
        # text as written: creation refuses exactly what sending would.
        parsed = client_url(url)
        host = parsed.raw_host if parsed is not None else None
        if not host:
            return "is not a URL the webhook client can send to"
        kind = self.refusal(classify_host(host))
        if kind is None:
            return None
        return (
            f"{host} is not a public address ({kind}); webhooks go only to public addresses "
            "unless ALLOW_PRIVATE_WEBHOOK_URLS=true"
        )

    def check_address(self, host: str) -> None:
        """Raise Blocked unless `host`, an IP address, may be connected to."""
        address = parse_address(host)
        # An address that does not parse is refused: the guard fails closed.
        kind = self.refusal(classify(address)) if address is not None else Kind.RESERVED
        if kind is not None:
            raise Blocked(f"{host} is not a public address ({kind})")


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and drops the addresses the policy refuses."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        kept, refused = [], []
        for result in results:
            try:
                self.policy.check_address(result["host"])
            except Blocked as exc:
                refused.append(str(exc))
            else:
                kept.append(result)
        if not kept:
            raise Blocked(f"{host} resolves only to refused addresses: {_unique(refused)}")
        return kept

    async def close(self) -> None:
        await self.inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A TCP connector that connects only to addresses `policy` allows."""

    def __init__(
        self, policy: AddressPolicy, *, resolver: AbstractResolver | None = None, **kwargs: Any
    ) -> None:
        self._guard = GuardedResolver(policy, resolver)
        super().__init__(resolver=self._guard, **kwargs)
        self.policy = policy

    async def connect(  # the signature is aiohttp's
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Connection:
        # aiohttp never passes IP literals to the resolver, so they are checked here.
        host = req.url.raw_host
        if host is not None and parse_address(host) is not None:
            self.policy.check_address(host)
        return await super().connect(req, traces, timeout)

    async def close(self, **kwargs: Any) -> None:
        await super().close(**kwargs)
        await self._guard.close()


def _unique(items: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(items))
