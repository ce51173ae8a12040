"""Asking Bakong about due md5s (and for deep links) without hurting it or lying about it.

Batched per credential (50 md5s a list call; per-md5 for final checks, unclear list items
and where the list endpoint is refused), a bounded number of calls in flight, the rate limit
that every process shares (taken once per wave of calls, final checks first, then young
md5s, then older ones; the late watch only from what is spare), 429 pauses per credential
and a circuit breaker per credential. Every item gets a CheckResult: an answer, or an ERROR
that says why there is none (never evidence that a payment did not happen). Deep links go the
same way, one call each: the same breaker, limit and pauses, and no link when they say no.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, TypeVar
from uuid import UUID

from khqr_gateway.bakong.breaker import Breaker, CircuitState
from khqr_gateway.bakong.client import MAX_BATCH, BakongClient, BakongError, SourceInfo
from khqr_gateway.bakong.model import CheckKind, CheckResult, ErrorKind
from khqr_gateway.credentials.renewal import REFUSED, Credentials, NoToken
from khqr_gateway.infra.ratelimit import Grant, RateLimit
from khqr_gateway.metrics import (
    BAKONG_CIRCUIT,
    BAKONG_ONE_BY_ONE,
    BAKONG_THROTTLED,
    DEFAULT_CREDENTIAL,
    PER_TRANSACTION,
    credential_label,
)
from khqr_gateway.transactions.budget import Budget, young
from khqr_gateway.transactions.model import PollItem

log = logging.getLogger(__name__)

# A credential whose list endpoint is refused (403/404) has it asked again this often, with
# one list call: it may be allowed again, and one call per md5 costs up to 50 times more.
LIST_RETRY_S = 120.0
# The share of the rate limit's bucket that checks of older md5s, and late-watch checks,
# leave to the others (it stays full only while the demand is below the rate).
OLD_KEEP = 0.2
LATE_KEEP = 0.5
# Breaker: opens after this many failed calls in a row, then probes after one poll
# interval, doubling up to ten intervals (30 s at the default POLL_INTERVAL_S).
BREAKER_THRESHOLD = 5
BACKOFF_CAP_S = 30.0
# What an item the checker has no result for (it never should) counts as.
NO_RESULT = CheckResult(CheckKind.ERROR, error=ErrorKind.NO_RESULT)

T = TypeVar("T")


class Need(IntEnum):
    """The order in which calls get the rate limit's room: the check at or after the
    deadline first, then young md5s (customers pay early), then the others."""

    FINAL = 0
    YOUNG = 1
    OLD = 2


def need(item: PollItem, now: datetime) -> Need:
    if now >= item.deadline_at:
        return Need.FINAL
    return Need.YOUNG if young(item, now) else Need.OLD


@dataclass(slots=True)
class Call:
    """One Bakong request to make: a list check of up to 50 md5s, or one per-md5 check."""

    credential: int | None
    token: str | None
    items: Sequence[PollItem]
    single: bool
    need: Need = Need.YOUNG


@dataclass(slots=True)
class Answer:
    results: dict[UUID, CheckResult]
    follow_ups: list[Call] = field(default_factory=list)


def chunks(items: Sequence[PollItem], size: int = MAX_BATCH) -> Iterable[Sequence[PollItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _all(items: Iterable[PollItem], result: CheckResult) -> dict[UUID, CheckResult]:
    return {i.id: result for i in items}


def _later(results: dict[UUID, CheckResult], wait: float | None) -> dict[UUID, CheckResult]:
    """The results, each asking to be checked again no sooner than `wait` seconds."""
    if wait is None:
        return results
    return {
        job: dataclasses.replace(r, retry_after=max(r.retry_after or 0.0, wait))
        for job, r in results.items()
    }


def _label(credential: int | None) -> str:
    return "default" if credential is None else str(credential)


def _singles(
    credential: int | None, token: str | None, items: Iterable[PollItem], now: datetime
) -> list[Call]:
    return [Call(credential, token, [i], single=True, need=need(i, now)) for i in items]


def _tiers(calls: list[Call], *, late: bool) -> list[tuple[float, list[Call]]]:
    """The calls (sorted by need) in one take each, with the share of the bucket that take
    must leave: older md5s leave the last fifth to final checks and young ones, whatever
    bunched them (a first round, a restart), and the late watch half of it to all."""
    if late:
        return [(LATE_KEEP, calls)]
    urgent = [c for c in calls if c.need < Need.OLD]
    old = calls[len(urgent) :]
    return [(keep, tier) for keep, tier in ((0.0, urgent), (OLD_KEEP, old)) if tier]


class Checker:
    """One per process; keeps each credential's breaker and list-endpoint fallback."""

    def __init__(
        self,
        *,
        bakong: BakongClient,
        credentials: Credentials,
        limits: RateLimit | None,
        interval_s: float,
        max_in_flight: int = 8,
        breaker_threshold: int = BREAKER_THRESHOLD,
    ) -> None:
        self.bakong = bakong
        self.credentials = credentials
        self.limits = limits
        self.interval_s = interval_s
        self.max_in_flight = max_in_flight
        self.breaker_threshold = breaker_threshold
        self.backoff_base_s = interval_s
        self.backoff_cap_s = max(interval_s, min(BACKOFF_CAP_S, 10 * interval_s))
        self._slots = asyncio.Semaphore(max_in_flight)
        self._breakers: dict[int | None, Breaker] = {}
        # Credentials whose list endpoint is refused: when to ask it again (monotonic).
        self._list_refused: dict[int | None, float] = {}
        self.budget = (
            Budget(credentials.pool, rate=limits.rate, interval_s=interval_s)
            if limits is not None
            else None
        )

    def breaker(self, credential: int | None) -> Breaker:
        if credential not in self._breakers:
            self._breakers[credential] = Breaker(
                self.breaker_threshold, self.backoff_base_s, self.backoff_cap_s
            )
        return self._breakers[credential]

    def one_by_one(self) -> bool:
        """Whether some credential's md5s are checked one call each (its list refused)."""
        return bool(self._list_refused)

    def gap_s(self, item: PollItem, now: datetime) -> float:
        """Seconds from this check of an md5 to its next: the poll interval, unless its
        credential's list endpoint is refused and the budget gives it less often."""
        if self.budget is None or self._credential(item) not in self._list_refused:
            return self.interval_s
        return self.budget.gap_s(item, now)

    def modes(self) -> dict[str, Any]:
        """How this process checks md5s, for /api/v1/stats and /ready."""
        default = self.credentials.default_id
        out: dict[str, Any] = {
            "mode": "single" if default in self._list_refused else "list",
            "singleCredentials": len(self._list_refused),
        }
        if self._list_refused:
            retry = min(self._list_refused.values()) - time.monotonic()
            out["listRetryInS"] = round(max(0.0, retry), 1)
        summary = self.budget.summary() if self.budget is not None else None
        if summary is not None:
            out["budget"] = summary
        return out

    def _credential(self, item: PollItem) -> int | None:
        if item.credential_id is None:
            return self.credentials.default_id
        return item.credential_id

    def circuits(self) -> dict[str, str]:
        """The state of each credential's breaker that is not closed, for /api/v1/stats."""
        now = time.monotonic()
        return {
            _label(c): b.state(now).value
            for c, b in self._breakers.items()
            if b.state(now) is not CircuitState.CLOSED
        }

    async def deeplink(self, credential: int | None, qr: str, source: SourceInfo) -> str | None:
        """Bakong's deep link for `qr`, or None: a QR works without one, so an open breaker,
        a full rate limit or a failed call means no link, never a wait or an error."""
        if credential is None:
            credential = self.credentials.default_id
        if self.breaker(credential).allowed_calls(time.monotonic()) == 0:
            return None
        try:
            call = Call(credential, await self.credentials.token(credential), [], single=True)
            if not await self._retry_allowed(credential):
                return None
            link = await self._renewing(call, lambda token: self.bakong.deeplink(token, qr, source))
        except NoToken:
            return None
        except BakongError as exc:
            await self._health(credential, exc.kind, exc.retry_after)
            log.warning(
                "bakong gave no deep link: %s", exc.kind, extra={"credentialId": credential}
            )
            return None
        except Exception as exc:
            # Redis or Postgres away (the shared limit, the token), a bug: still the QR.
            log.error("no deep link: %s", type(exc).__name__, extra={"credentialId": credential})
            return None
        await self._health(credential, None, None)
        return link

    async def check(
        self, items: Sequence[PollItem], now: datetime, *, late: bool = False
    ) -> dict[UUID, CheckResult]:
        """Ask Bakong about every item; each gets an answer or the reason it has none.

        `late` checks (md5s given up on, watched for a late payment) make no final checks
        and book no turn in the rate limit: they take only what is free now, behind the
        live checks, and an md5 the limit puts off is simply checked at its next turn."""
        groups: dict[int | None, list[PollItem]] = defaultdict(list)
        for item in items:
            groups[self._credential(item)].append(item)
        results: dict[UUID, CheckResult] = {}
        calls: list[Call] = []
        for credential, group in groups.items():
            calls += await self._plan(credential, group, now, results, late=late)
        follow_ups = await self._send(calls, results, late=late)
        await self._send(follow_ups, results, late=late)  # per-md5: no follow-ups
        await self._rebudget()
        return results

    async def _rebudget(self) -> None:
        """Keep the budget's counts fresh while some list endpoint is refused."""
        if self.budget is None:
            return
        if not self._list_refused:
            self.budget.clear()
            return
        await self.budget.refresh(self._list_refused, self.credentials.default_id)

    async def _plan(
        self,
        credential: int | None,
        group: list[PollItem],
        now: datetime,
        results: dict[UUID, CheckResult],
        *,
        late: bool = False,
    ) -> list[Call]:
        """The calls one credential's items need, minus those its breaker holds back."""
        try:
            token = await self.credentials.token(credential)
        except NoToken:
            results.update(_all(group, CheckResult(CheckKind.ERROR, error=ErrorKind.NO_TOKEN)))
            return []
        final = [] if late else [i for i in group if now >= i.deadline_at]
        regular = group if late else [i for i in group if now < i.deadline_at]
        calls = [Call(credential, token, [i], single=True, need=Need.FINAL) for i in final]
        calls += self._regular(credential, token, regular, now, late=late)
        mono = time.monotonic()
        breaker = self.breaker(credential)
        allowed = breaker.allowed_calls(mono)
        if allowed is not None and len(calls) > allowed:
            wait = breaker.wait_s(mono) or self.backoff_base_s
            held = CheckResult(CheckKind.ERROR, error=ErrorKind.CIRCUIT_OPEN, retry_after=wait)
            for call in calls[allowed:]:
                results.update(_all(call.items, held))
            calls = calls[:allowed]
        return calls

    def _regular(
        self,
        credential: int | None,
        token: str | None,
        items: list[PollItem],
        now: datetime,
        *,
        late: bool,
    ) -> list[Call]:
        """List calls; one call per md5 where the list endpoint is refused, but for one list
        call every LIST_RETRY_S (of a live check: a late one may get no room) that asks
        whether it is allowed again."""
        if not items:
            return []
        retry_at = self._list_refused.get(credential)
        if retry_at is None:
            return [Call(credential, token, chunk, single=False) for chunk in chunks(items)]
        if late or time.monotonic() < retry_at:
            return _singles(credential, token, items, now)
        # Asked with the first list's worth of md5s; the others one by one meanwhile.
        self._list_refused[credential] = time.monotonic() + LIST_RETRY_S
        probe = Call(credential, token, items[:MAX_BATCH], single=False)
        return [probe, *_singles(credential, token, items[MAX_BATCH:], now)]

    async def _send(
        self, calls: list[Call], results: dict[UUID, CheckResult], *, late: bool = False
    ) -> list[Call]:
        """Send what the rate limit allows now in order of need, and in the claim's
        oldest-due-first order within one need; returns follow-up calls."""
        if not calls:
            return []
        calls = sorted(calls, key=lambda c: c.need)
        runnable: list[Call] = []
        next_turns: list[float | None] = []
        for keep, tier in _tiers(calls, late=late):
            admitted, turns = await self._admit(tier, results, keep=keep, queue=not late)
            runnable += admitted
            next_turns += turns
        answers = await asyncio.gather(*(self._call(c) for c in runnable))
        follow_ups: list[Call] = []
        for answer, turn in zip(answers, next_turns, strict=True):
            results.update(_later(answer.results, turn))
            follow_ups += answer.follow_ups
        return follow_ups

    async def _admit(
        self, calls: list[Call], results: dict[UUID, CheckResult], *, keep: float, queue: bool
    ) -> tuple[list[Call], list[float | None]]:
        """The calls the rate limit lets out now, with the turn of each one's next check;
        the others are answered `throttled` with their turn (or none: their next check)."""
        grant = await self._take(Counter(c.credential for c in calls), keep=keep, queue=queue)
        runnable: list[Call] = []
        deferred: list[Call] = []
        for call in calls:
            paused = grant.paused_s.get(call.credential)
            if paused is not None:
                result = CheckResult(
                    CheckKind.ERROR, error=ErrorKind.RATE_LIMITED, retry_after=paused
                )
                results.update(_all(call.items, result))
            elif len(runnable) < grant.calls:
                runnable.append(call)
            else:
                deferred.append(call)
        rate = self.limits.rate if self.limits else 1.0
        if deferred:
            BAKONG_THROTTLED.inc(len(deferred))
        for call, turn in zip(deferred, grant.turns(len(deferred), rate), strict=True):
            later = CheckResult(CheckKind.ERROR, error=ErrorKind.THROTTLED, retry_after=turn)
            results.update(_all(call.items, later))
        # Over the limit, those asked now come back at their turns, behind those waiting:
        # none is starved, every md5's interval stretches alike.
        return runnable, grant.turns(len(runnable), rate, after=len(deferred))

    async def _take(
        self, wanted: Mapping[int | None, int], *, keep: float = 0.0, queue: bool = True
    ) -> Grant:
        if self.limits is None:
            return Grant(sum(wanted.values()), {})
        return await self.limits.take(wanted, queue=queue, keep=keep)

    async def _call(self, call: Call) -> Answer:
        async with self._slots:
            try:
                if call.single:
                    return await self._single(call)
                return await self._list(call)
            except Exception as exc:
                # One broken call (a token aiohttp refuses to send, a bug) must not stop
                # the checks of every other credential in the tick.
                log.error(
                    "bakong call failed: %s",
                    type(exc).__name__,
                    extra={"credentialId": call.credential},
                )
                return Answer(
                    _all(call.items, CheckResult(CheckKind.ERROR, error=ErrorKind.CLIENT_ERROR))
                )

    async def _list(self, call: Call) -> Answer:
        md5s = [i.md5 for i in call.items]
        try:
            by_md5 = await self._renewing(
                call, lambda token: self.bakong.check_md5_list(token, md5s)
            )
        except NoToken:
            return Answer(_all(call.items, CheckResult(CheckKind.ERROR, error=ErrorKind.NO_TOKEN)))
        except BakongError as exc:
            if exc.list_unsupported:
                return Answer({}, self._fall_back_to_singles(call, exc))
            wait = await self._health(call.credential, exc.kind, exc.retry_after)
            error = CheckResult(CheckKind.ERROR, error=exc.kind, retry_after=wait)
            return Answer(_all(call.items, error))
        await self._health(call.credential, None, None)
        self._list_allowed(call.credential)
        results = {i.id: r for i in call.items if (r := by_md5.get(i.md5)) is not None}
        unclear = [i for i in call.items if by_md5.get(i.md5) is None]
        return Answer(results, _singles(call.credential, call.token, unclear, datetime.now(UTC)))

    def _fall_back_to_singles(self, call: Call, exc: BakongError) -> list[Call]:
        if call.credential not in self._list_refused:  # once per episode
            log.warning(
                "bakong list endpoint refused; checking md5s one call each, young ones first",
                extra={"status": exc.status, "credentialId": call.credential},
            )
        self._list_refused[call.credential] = time.monotonic() + LIST_RETRY_S
        self._export_modes()
        return _singles(call.credential, call.token, call.items, datetime.now(UTC))

    def _list_allowed(self, credential: int | None) -> None:
        if self._list_refused.pop(credential, None) is not None:
            log.info("bakong list endpoint answers again", extra={"credentialId": credential})
            self._export_modes()

    def _export_modes(self) -> None:
        """How many credentials are checked one call per md5, by bounded label."""
        default_id = self.credentials.default_id
        single = Counter({DEFAULT_CREDENTIAL: 0, PER_TRANSACTION: 0})
        for credential in self._list_refused:
            single[credential_label(credential, default_id)] += 1
        for label, count in single.items():
            BAKONG_ONE_BY_ONE.labels(label).set(count)

    async def _single(self, call: Call) -> Answer:
        item = call.items[0]
        try:
            result = await self._renewing(
                call, lambda token: self.bakong.check_md5(token, item.md5)
            )
        except NoToken:
            return Answer({item.id: REFUSED})
        wait = await self._health(call.credential, result.error, result.retry_after)
        return Answer({item.id: dataclasses.replace(result, retry_after=wait)})

    async def _renewing(self, call: Call, send: Callable[[str | None], Awaitable[T]]) -> T:
        """Send; on 401 renew the credential's token once and send again, if the rate limit
        has room for the second call. The call keeps the token last sent."""
        answer, call.token = await self.credentials.renewing(
            call.credential,
            call.token,
            send,
            retry_allowed=lambda: self._retry_allowed(call.credential),
        )
        return answer

    async def _retry_allowed(self, credential: int | None) -> bool:
        return (await self._take({credential: 1}, queue=False)).calls >= 1

    async def _health(
        self, credential: int | None, error: ErrorKind | None, retry_after: float | None
    ) -> float | None:
        """Feed one call's outcome to the credential's breaker; returns seconds to hold off."""
        breaker = self.breaker(credential)
        mono = time.monotonic()
        if error is ErrorKind.RATE_LIMITED:
            pause = breaker.rate_limited(retry_after)
            if self.limits is not None:
                await self.limits.pause(credential, pause)
            log.warning(
                "bakong answered 429: pausing this credential",
                extra={"credentialId": credential, "pauseS": round(pause, 3)},
            )
            return pause
        if error is not None and error.unhealthy:
            if breaker.failure(mono):
                self._export_circuits(mono)
                log.warning(
                    "bakong circuit open: no calls for this credential until a probe succeeds",
                    extra={
                        "credentialId": credential,
                        "error": error,
                        "retryInS": round(breaker.wait_s(mono), 3),
                    },
                )
            return breaker.wait_s(mono) or None
        # Any other reply, errors in a well-formed envelope included, shows Bakong is up.
        was_open = breaker.state(mono) is not CircuitState.CLOSED
        breaker.success()
        if was_open:
            self._export_circuits(mono)
            log.info("bakong circuit closed", extra={"credentialId": credential})
        return None

    def _export_circuits(self, mono: float) -> None:
        """How many breakers are not closed, by bounded credential label (see metrics)."""
        default_id = self.credentials.default_id
        opened = Counter({DEFAULT_CREDENTIAL: 0, PER_TRANSACTION: 0})
        for credential, breaker in self._breakers.items():
            if breaker.state(mono) is not CircuitState.CLOSED:
                opened[credential_label(credential, default_id)] += 1
        for label, count in opened.items():
            BAKONG_CIRCUIT.labels(label).set(count)
