"""Every Redis key of the gateway, in one place (as arq's constants.py), under one hash tag."""

from __future__ import annotations

from typing import TypedDict


class RedisKeys(TypedDict):
    """The keys of one namespace (REDIS_NAMESPACE); the type checker knows each name."""

    # Schedules: sorted sets of due members, score = due time in epoch ms.
    poll: str
    deliver: str
    deliver_retry: str
    # Timed-out and cancelled transactions watched for a late payment.
    late: str
    # The pub/sub channel of live status.
    events: str
    # Bakong: the shared rate-limit bucket; prefixes of per-credential keys
    # (`sub_key(prefix, credential)`) for 429 pauses and token-renewal locks.
    bakong_rate: str
    bakong_pause: str
    bakong_renew: str
    # Per app request counters, one key a second: `sub_key(prefix, app id, second)`.
    api_rate: str
    # The pub/sub channel on which a process says an app's keys or secrets changed.
    apps: str
    # Per hour, the highest poll lag any process saw (ms): the dashboard's lag chart.
    lag_peaks: str


def keys(namespace: str) -> RedisKeys:
    """The keys of `namespace`. They share one hash tag, so that every script and pipeline
    touching several of them runs on the one Redis Cluster node holding that slot."""
    tag = "{" + namespace + "}"
    return {
        "poll": f"{tag}:poll",
        "deliver": f"{tag}:deliver",
        "deliver_retry": f"{tag}:deliver:retry",
        "late": f"{tag}:late",
        "events": f"{tag}:events",
        "bakong_rate": f"{tag}:bakong:rate",
        "bakong_pause": f"{tag}:bakong:pause",
        "bakong_renew": f"{tag}:bakong:renew",
        "api_rate": f"{tag}:api:rate",
        "apps": f"{tag}:apps",
        "lag_peaks": f"{tag}:figures:lag",
    }


def sub_key(prefix: str, *parts: str | int) -> str:
    """The key of one thing under a prefix of `keys`: `<prefix>:<part>:...`."""
    return ":".join((prefix, *map(str, parts)))
