"""Bakong credentials: which token each transaction's checks use, and their renewal by email.

A credential is a token, an email, or both. A token's expiry is its JWT `exp` claim (read, not
verified). Credentials with an email are renewed through `renew_token`: by the token tick
before they expire, and at once when Bakong rejects their token (401). One renewal per
credential happens at a time across every gateway process (a Redis lock). A credential whose
token is unusable and cannot be renewed is marked `expired` with why and logged at error
level; its transactions time out as `bakong_unauthorized`. An expired email credential is
tried again at most once a minute while something needs it (the token tick, a check);
adding the credential again revives it at once. A token-only credential that Bakong refused
(401) while its `exp` was still ahead is only refused, not dead: while something needs it,
Bakong is asked again with backoff and the credential is active again once it accepts the
token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg

from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.bakong.breaker import backoff_s
from khqr_gateway.bakong.client import BakongClient, BakongError
from khqr_gateway.bakong.model import CheckKind, CheckResult, ErrorKind
from khqr_gateway.credentials import store as credential_store
from khqr_gateway.credentials.model import (
    Credential,
    CredentialStatus,
    _usable,
    expiry_seconds,
    jwt_expiry,
    refused,
    token_expired,
)
from khqr_gateway.infra.locks import Locks, LockTimeout
from khqr_gateway.metrics import (
    CREDENTIALS,
    DEFAULT_CREDENTIAL,
    PER_TRANSACTION,
    TOKEN_EXPIRY,
    TOKEN_RENEWALS,
    credential_label,
)

log = logging.getLogger(__name__)

SANDBOX_TOKEN_EMAIL = "sandbox@khqr-gateway.local"
_CACHE_TTL_S = 30.0
# Tokens and emails a process remembers having stored (see `Credentials.add`).
KNOWN_MAX = 10_000
# Longer than a renew_token call can take, so a live holder never loses the lock.
RENEW_LOCK_TTL_MS = 30_000
# Renewal failures that no retry will fix.
PERMANENT_RENEWAL_ERRORS = frozenset({ErrorKind.NOT_REGISTERED, ErrorKind.RENEW_FAILED})
# An expired email credential that is asked for is tried again at most this often.
EXPIRED_RETRY_S = 60.0
# A refused token-only credential is asked about again after these many seconds, doubling.
REFUSED_PROBE_FIRST_S = 5.0
REFUSED_PROBE_MAX_S = 300.0
# The md5 a probe asks about: Bakong knows no payment by it, so any envelope means "accepted".
PROBE_MD5 = "0" * 32
# A check whose token Bakong refused, and that no renewal could replace.
REFUSED = CheckResult(CheckKind.ERROR, error=ErrorKind.UNAUTHORIZED)

T = TypeVar("T")


@dataclass(slots=True)
class _Refusal:
    """Refusals of one credential's token in a row, and when to ask Bakong again."""

    count: int = 0
    next_at: float = 0.0  # time.monotonic()

    def wait_s(self) -> float:
        return backoff_s(self.count - 1, REFUSED_PROBE_FIRST_S, REFUSED_PROBE_MAX_S)

    def note(self, now: float) -> None:
        self.count += 1
        self.next_at = now + self.wait_s()


class NoToken(Exception):
    """A credential that has no usable token (expired, or its email cannot be renewed)."""


class Credentials:
    """Tokens by credential id, cached briefly; renews email credentials once at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        bakong: BakongClient,
        locks: Locks | None = None,
        *,
        renew_before_days: int = 7,
        lock_wait_s: float = RENEW_LOCK_TTL_MS / 1000,
    ) -> None:
        self.pool = pool
        self.bakong = bakong
        self.locks = locks
        self.renew_before = timedelta(days=renew_before_days)
        self.lock_wait_s = lock_wait_s
        self.default_id: int | None = None
        self._cache: dict[int, tuple[float, Credential]] = {}
        # fingerprint -> (credential id, the token last stored with it), least recent first.
        # (app, fingerprint) to (credential id, token): a credential is its app's own.
        self._known: OrderedDict[tuple[str, str], tuple[int, str | None]] = OrderedDict()
        self._locks: dict[int, asyncio.Lock] = {}
        # Per process: after a restart a refused credential is asked about once at once.
        self._refusals: dict[int, _Refusal] = {}

    async def setup_default(self, token: str | None, email: str | None) -> None:
        """Store the configured default credential (BAKONG_TOKEN / BAKONG_EMAIL)."""
        if not (token or email):
            return
        cred = await credential_store.upsert_credential(
            self.pool,
            token=token,
            email=email,
            expires_at=jwt_expiry(token) if token else None,
            is_default=True,
        )
        self.default_id = cred.id

    async def add(
        self, *, token: str | None, email: str | None, app_id: str = DEFAULT_APP_ID
    ) -> int:
        """The id of the credential of this token or email, stored if new.

        The rachhen/khqr-webhook route sends a token with every request: one this process
        has stored already costs no write (the same token has the same expiry; ids never
        change). A refused one is revived by its probe, not by being sent again.
        """
        key = (app_id, credential_store.credential_fingerprint(token=token, email=email))
        known = self._known.get(key)
        if known is not None and known[1] == token:
            self._known.move_to_end(key)
            return known[0]
        cred, _ = await self._store(token, email, app_id)
        self._known[key] = (cred.id, token)
        if len(self._known) > KNOWN_MAX:
            self._known.popitem(last=False)
        return cred.id

    async def _store(
        self, token: str | None, email: str | None, app_id: str
    ) -> tuple[Credential, bool]:
        """Store the app's credential of this token or email (the token's expiry read from
        it), forgetting what this process held of it."""
        cred, created = await credential_store.save_credential(
            self.pool,
            token=token,
            email=email,
            expires_at=jwt_expiry(token) if token else None,
            app_id=app_id,
        )
        self._cache.pop(cred.id, None)
        return cred, created

    async def save(
        self, *, token: str | None, email: str | None, app_id: str = DEFAULT_APP_ID
    ) -> tuple[Credential, bool]:
        """Add or replace a credential (POST /api/v1/credentials); returns it and whether new.

        An email credential without a usable token is renewed at once, so that the answer
        says whether the email works.
        """
        cred, created = await self._store(token, email, app_id)
        if cred.email and _usable(cred, None) is None:
            with contextlib.suppress(NoToken):
                await self.renew(cred.id, stale=cred.token, rejected=False)
            cred = await self._fresh(cred.id) or cred
        return cred, created

    async def get(self, credential_id: int) -> Credential | None:
        hit = self._cache.get(credential_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return await self._fresh(credential_id)

    async def _fresh(self, credential_id: int) -> Credential | None:
        found = await credential_store.credentials_by_id(self.pool, [credential_id])
        cred = found.get(credential_id)
        if cred:
            self._cache[credential_id] = (time.monotonic() + _CACHE_TTL_S, cred)
        return cred

    async def token(self, credential_id: int | None) -> str | None:
        """The token to call Bakong with; None means call without one (sandbox)."""
        if credential_id is None:
            credential_id = self.default_id
        if credential_id is None:
            return None
        cred = await self.get(credential_id)
        if cred is not None and cred.status is CredentialStatus.EXPIRED:
            cred = await self._fresh(credential_id)
            if cred is not None and refused(cred):
                return await self._probe(cred)
            if (
                cred is not None
                and cred.status is CredentialStatus.EXPIRED
                and not _retry_due(cred)
            ):
                raise NoToken(f"credential {credential_id} is expired")
        if cred is None:
            raise NoToken(f"credential {credential_id} not found")
        if token := _usable(cred, None):
            self._refusals.pop(credential_id, None)
            return token
        return await self.renew(credential_id, stale=cred.token, rejected=False)

    async def renew(self, credential_id: int, *, stale: str | None, rejected: bool = True) -> str:
        """A fresh token, renewed by email once however many callers (and processes) ask.

        `stale` is the token the caller found wanting; `rejected` says Bakong refused it
        (401), so it is unusable even if its `exp` is still ahead. When another caller has
        replaced it already, the replacement is returned without calling Bakong; when
        another caller failed to renew it meanwhile, NoToken without trying again.
        """
        asked_at = datetime.now(UTC)
        async with self._locks.setdefault(credential_id, asyncio.Lock()):
            cred = await self._fresh(credential_id)
            if token := _usable(cred, stale):
                return token
            if cred is None:
                raise NoToken(f"credential {credential_id} not found")
            if not cred.email:
                if rejected and cred.token and not token_expired(cred.token):
                    self._refused(credential_id)
                why = "Bakong rejected the token" if rejected else "the token has expired"
                await self._expire(cred, f"{why} and there is no email to renew it")
                raise NoToken(f"credential {credential_id} cannot be renewed")
            try:
                async with self._shared_lock(credential_id):
                    cred = await self._fresh(credential_id)
                    if token := _usable(cred, stale):
                        return token
                    assert cred is not None and cred.email
                    if _failed_since(cred, asked_at):
                        raise NoToken(f"credential {credential_id}: renewal just failed")
                    return await self._renew_now(cred, rejected=rejected and cred.token == stale)
            except LockTimeout:
                raise NoToken(f"credential {credential_id}: renewal elsewhere is stuck") from None

    async def renewing(
        self,
        credential_id: int | None,
        token: str | None,
        send: Callable[[str | None], Awaitable[T]],
        *,
        retry_allowed: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[T, str | None]:
        """`send(token)` to Bakong; when Bakong refuses the token (a 401 raised, or a check's
        `unauthorized` result), renew the credential's token once and send again with it if
        `retry_allowed` lets a second call out (else the refusal stands). Returns the answer
        and the token last sent; NoToken when no fresh token can be had."""
        try:
            answer = await send(token)
        except BakongError as exc:
            if not exc.unauthorized:
                raise
            return await self._send_again(credential_id, token, send, retry_allowed, exc)
        if isinstance(answer, CheckResult) and answer.error is ErrorKind.UNAUTHORIZED:
            return await self._send_again(credential_id, token, send, retry_allowed, answer)
        return answer, token

    async def _send_again(
        self,
        credential_id: int | None,
        stale: str | None,
        send: Callable[[str | None], Awaitable[T]],
        retry_allowed: Callable[[], Awaitable[bool]] | None,
        refusal: T | BakongError,
    ) -> tuple[T, str | None]:
        if credential_id is None:
            raise NoToken("no credential to renew")
        token = await self.renew(credential_id, stale=stale)
        if retry_allowed is None or await retry_allowed():
            return await send(token), token
        if isinstance(refusal, BakongError):
            raise refusal
        return refusal, token

    @contextlib.asynccontextmanager
    async def _shared_lock(self, credential_id: int) -> AsyncIterator[None]:
        if self.locks is None:
            yield
            return
        async with self.locks.hold(
            str(credential_id), ttl_ms=RENEW_LOCK_TTL_MS, wait_s=self.lock_wait_s
        ):
            yield

    async def _renew_now(self, cred: Credential, *, rejected: bool) -> str:
        assert cred.email is not None
        try:
            token = await self.bakong.renew_token(cred.email)
        except BakongError as exc:
            TOKEN_RENEWALS.labels(exc.kind).inc()
            await self._renewal_failed(cred, exc.kind, rejected=rejected)
            raise NoToken(f"credential {cred.id}: renewal failed ({exc.kind})") from None
        TOKEN_RENEWALS.labels("ok").inc()
        expires_at = jwt_expiry(token)
        await credential_store.save_token(self.pool, cred.id, token, expires_at)
        self._cache.pop(cred.id, None)
        if expires_at is not None and cred.id == self.default_id:
            TOKEN_EXPIRY.labels(DEFAULT_CREDENTIAL).set(expires_at.timestamp() - time.time())
        log.info(
            "bakong token renewed",
            extra={"credentialId": cred.id, "expiresAt": expires_at and expires_at.isoformat()},
        )
        return token

    async def _renewal_failed(self, cred: Credential, kind: ErrorKind, *, rejected: bool) -> None:
        error = f"token renewal failed: {kind}"
        if rejected or _usable(cred, None) is None:
            await self._expire(cred, error)
            return
        # The current token still works for a while: keep using it, say why renewal failed.
        await credential_store.set_credential_error(self.pool, cred.id, error)
        self._cache.pop(cred.id, None)
        permanent = kind in PERMANENT_RENEWAL_ERRORS
        log.log(
            logging.ERROR if permanent and cred.last_error != error else logging.WARNING,
            "bakong token renewal failed; the current token works until it expires",
            extra={"credentialId": cred.id, "error": kind, "expiresAt": _iso(cred.expires_at)},
        )

    async def _expire(self, cred: Credential, error: str) -> None:
        changed = await credential_store.mark_credential_expired(self.pool, cred.id, error)
        self._cache.pop(cred.id, None)
        if cred.id == self.default_id:
            seconds = expiry_seconds(replace(cred, status=CredentialStatus.EXPIRED)) or 0.0
            TOKEN_EXPIRY.labels(DEFAULT_CREDENTIAL).set(seconds)
        log.log(
            logging.ERROR if changed or cred.last_error != error else logging.WARNING,
            "bakong credential expired: its transactions will time out as bakong_unauthorized",
            extra={"credentialId": cred.id, "error": error, "isDefault": cred.is_default},
        )

    def _refused(self, credential_id: int) -> None:
        """Bakong refused the token: ask again after the backoff, however many calls of one
        wave were refused together."""
        refusal = self._refusals.setdefault(credential_id, _Refusal())
        now = time.monotonic()
        if refusal.next_at <= now:
            refusal.note(now)

    async def _probe(self, cred: Credential) -> str:
        """The token of a refused credential if Bakong accepts it now; asked at most once
        per backoff, by one caller, the others getting NoToken meanwhile."""
        assert cred.token is not None
        refusal = self._refusals.setdefault(cred.id, _Refusal())
        now = time.monotonic()
        if refusal.next_at > now:
            raise NoToken(f"credential {cred.id}: Bakong refused its token")
        refusal.next_at = now + refusal.wait_s()  # the other callers wait for this one
        result = await self.bakong.check_md5(cred.token, PROBE_MD5)
        if result.kind is CheckKind.ERROR:
            if result.error is ErrorKind.UNAUTHORIZED:  # else Bakong is unwell: no news, same wait
                refusal.note(time.monotonic())
            log.info(
                "bakong did not accept the refused token; asking again later",
                extra={"credentialId": cred.id, "error": result.error, "refusals": refusal.count},
            )
            raise NoToken(f"credential {cred.id}: Bakong refused its token")
        return await self._accepted(cred, cred.token)

    async def _accepted(self, cred: Credential, token: str) -> str:
        self._refusals.pop(cred.id, None)
        self._cache.pop(cred.id, None)
        if await credential_store.reactivate_credential(self.pool, cred.id, token):
            TOKEN_EXPIRY.labels(str(cred.id)).set(
                expiry_seconds(replace(cred, status=CredentialStatus.ACTIVE)) or 0.0
            )
            log.warning(
                "bakong accepts the credential's token again: credential active",
                extra={"credentialId": cred.id, "isDefault": cred.is_default},
            )
        return token

    async def tick(self) -> None:
        """The token tick: renew what expires soon, mark what cannot be used, export expiries."""
        renew_before = datetime.now(UTC) + self.renew_before
        for cred in await credential_store.credentials_needing_care(self.pool, renew_before):
            if cred.email:
                with contextlib.suppress(NoToken):
                    await self.renew(cred.id, stale=cred.token, rejected=False)
            else:
                await self._expire(cred, "the token has expired and there is no email to renew it")
        await self._probe_default()
        await self.export_expiries()

    async def _probe_default(self) -> None:
        """A refused default is asked about even while no transaction uses it: `/ready`."""
        if self.default_id is None:
            return
        cred = await self._fresh(self.default_id)
        if cred is not None and refused(cred):
            with contextlib.suppress(NoToken):
                await self._probe(cred)

    async def export_expiries(self) -> None:
        """Token expiry and credential counts, in the bounded series `default` and
        `per_transaction` (the soonest expiry of the other active credentials)."""
        now = time.time()
        counts: Counter[tuple[str, str]] = Counter()
        soonest: float | None = None
        async for cred in self._every_credential():
            label = credential_label(cred.id, self.default_id)
            counts[label, cred.status] += 1
            seconds = expiry_seconds(cred, now)
            if seconds is None:
                continue
            if label == DEFAULT_CREDENTIAL:
                TOKEN_EXPIRY.labels(label).set(seconds)
            elif cred.status is CredentialStatus.ACTIVE:
                soonest = seconds if soonest is None else min(soonest, seconds)
        if soonest is None:
            TOKEN_EXPIRY.remove(PER_TRANSACTION)
        else:
            TOKEN_EXPIRY.labels(PER_TRANSACTION).set(soonest)
        for label in (DEFAULT_CREDENTIAL, PER_TRANSACTION):
            for status in CredentialStatus:
                CREDENTIALS.labels(label, status).set(counts[label, status])

    async def _every_credential(self) -> AsyncIterator[Credential]:
        after: int | None = None
        while page := await credential_store.list_credentials(
            self.pool, None, after=after, limit=1000
        ):
            for cred in page:
                yield cred
            after = page[-1].id


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _retry_due(cred: Credential) -> bool:
    """An expired credential may be renewed again: it has an email and a while has passed."""
    if not cred.email:
        return False
    if cred.updated_at is None:
        return True
    return (datetime.now(UTC) - cred.updated_at).total_seconds() >= EXPIRED_RETRY_S


def _failed_since(cred: Credential, moment: datetime) -> bool:
    """Marked expired after `moment`: a renewal failed while we waited for the lock."""
    return (
        cred.status is CredentialStatus.EXPIRED
        and cred.updated_at is not None
        and cred.updated_at > moment
    )
