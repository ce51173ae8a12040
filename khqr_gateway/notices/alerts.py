"""Operator alerts to Telegram: a credential expiring, Bakong failing, deliveries failing."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from khqr_gateway.bakong.client import RecentCalls
from khqr_gateway.credentials.model import CredentialStatus

log = logging.getLogger(__name__)

CREDENTIAL_WARN_S = 3 * 86_400
BAKONG_FAILING_S = 300.0
# A Bakong call older than this says nothing of Bakong now.
EVIDENCE_S = 60.0
DELIVERIES_FAILING_S = 900
# Deliveries that gave up are looked for among those made in the last 2 days (the default
# retry schedule ends after 73 minutes), so that the query reads an index range, not every
# failed delivery ever kept; a manual retry of an older one that fails again is not counted.
GAVE_UP_LOOKBACK_S = 2 * 86400


class Alert(StrEnum):
    """What an operator is alerted about; the value is the row's `kind` in operator_alerts."""

    CREDENTIAL = "credential"
    BAKONG = "bakong"
    DELIVERIES = "deliveries"

    @property
    def subject(self) -> str:
        return _SUBJECTS[self]


_SUBJECTS = {
    Alert.CREDENTIAL: "the default Bakong credential",
    Alert.BAKONG: "Bakong",
    Alert.DELIVERIES: "webhook deliveries",
}


@dataclass
class Held:
    """How long a condition seen by this process has held; None while it does not."""

    after_s: float
    since: float | None = None

    def observe(self, bad: bool | None, now: float) -> bool | None:
        """True once `bad` has held `after_s`, False when it is not, None when unknown
        (no evidence either way leaves an episode as it is)."""
        if bad is None:
            # The clock of a condition starts again after a gap in the evidence: two
            # failures an hour apart are not an hour of failing. (While Bakong fails, the
            # breaker's probes, every 30 s at most, keep the evidence going.)
            self.since = None
            return None
        if not bad:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return True if now - self.since >= self.after_s else None


async def credential_problem(pool: asyncpg.Pool) -> str | None:
    """Why the default credential needs a person: expired, or expiring within 3 days."""
    row = await pool.fetchrow(
        "select id, status, expires_at, expires_at < now() as past,"
        " expires_at < now() + $1 * interval '1 second' as soon"
        " from credentials where is_default",
        CREDENTIAL_WARN_S,
    )
    if row is None:
        return None
    if row["status"] == CredentialStatus.EXPIRED or row["past"]:
        return f"credential {row['id']} has expired: set BAKONG_TOKEN or BAKONG_EMAIL"
    if row["soon"]:
        return f"credential {row['id']} expires at {_iso(row['expires_at'])}"
    return None


async def deliveries_problem(pool: asyncpg.Pool) -> str | None:
    """Webhooks being retried for 15 minutes or more, or that gave up in the last 15 after
    failing for 15 (out of retries: not delivered, so not "fine again"; a 410 at the first
    attempt is a receiver's answer, not a failing delivery), read from Postgres, so every
    process and restart agrees on when the episode began."""
    row = await pool.fetchrow(
        """
        select count(*) filter (where status = 'pending') as retrying,
               count(*) filter (where status = 'failed') as gave_up
        from deliveries
        where (status = 'pending' and attempt_count > 0
               and created_at < now() - $1 * interval '1 second')
           or (status = 'failed' and created_at >= now() - $2 * interval '1 second'
               and last_attempt_at >= now() - $1 * interval '1 second'
               and last_attempt_at - created_at >= $1 * interval '1 second')
        """,
        DELIVERIES_FAILING_S,
        GAVE_UP_LOOKBACK_S,
    )
    retrying, gave_up = row["retrying"], row["gave_up"]
    if not retrying and not gave_up:
        return None
    parts = []
    if retrying:
        parts.append(f"{retrying} webhook deliveries have been failing for 15 minutes or more")
    if gave_up:
        parts.append(f"{gave_up} gave up in the last 15 minutes after failing for 15")
    return "; ".join(parts)


def bakong_failing(recent: RecentCalls, now: float) -> bool | None:
    """Whether the newest Bakong call failed; None when none ended in the last minute (no
    evidence either way). Held 5 minutes, that is 5 minutes without one good answer."""
    if recent.last is None or now - recent.last[0] > EVIDENCE_S:
        return None
    return recent.last[1] != "ok"


async def flip(pool: asyncpg.Pool, kind: Alert, firing: bool, detail: str | None) -> bool:
    """Record that `kind` starts (or stops) firing; True only for the process that changed it."""
    if firing:
        changed = await pool.fetchval(
            """
            insert into operator_alerts (kind, firing, detail) values ($1, true, $2)
            on conflict (kind) do update set firing = true, detail = $2, changed_at = now()
            where not operator_alerts.firing returning kind
            """,
            kind,
            detail,
        )
    else:
        changed = await pool.fetchval(
            "update operator_alerts set firing = false, changed_at = now()"
            " where kind = $1 and firing returning kind",
            kind,
        )
    return changed is not None


Send = Callable[[str], Awaitable[bool]]


class Alerts:
    """The alert tick: each episode is sent once when it starts and once when it ends."""

    def __init__(self, *, pool: asyncpg.Pool, recent: RecentCalls, send: Send) -> None:
        self.pool = pool
        self.recent = recent
        self.send = send
        self._bakong = Held(BAKONG_FAILING_S)

    async def tick(self, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        wall = time.time() if now is None else now
        credential = await credential_problem(self.pool)
        await self._settle(Alert.CREDENTIAL, credential is not None, credential)
        failing = self._bakong.observe(bakong_failing(self.recent, wall), at)
        if failing is not None:
            await self._settle(Alert.BAKONG, failing, "no call has succeeded for 5 minutes")
        deliveries = await deliveries_problem(self.pool)
        await self._settle(Alert.DELIVERIES, deliveries is not None, deliveries)

    async def _settle(self, kind: Alert, firing: bool, detail: str | None) -> None:
        if not await flip(self.pool, kind, firing, detail):
            return
        text = (
            f"🔴 khqr-gateway: {kind.subject}: {detail}"
            if firing
            else f"✅ khqr-gateway: {kind.subject} is fine again"
        )
        if not await self.send(text):
            # Not announced: undone, so that the next tick tries again.
            await flip(self.pool, kind, not firing, detail)
            return
        log.info("operator alert sent", extra={"alert": kind, "firing": firing})


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "?"
