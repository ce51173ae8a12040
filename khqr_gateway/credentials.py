"""Bakong credentials: which token each transaction's checks use, and renewal through email."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from khqr_gateway.bakong.client import BakongClient, BakongError
from khqr_gateway.store import transactions as store
from khqr_gateway.store.transactions import Credential

log = logging.getLogger(__name__)

SANDBOX_TOKEN_EMAIL = "sandbox@khqr-gateway.local"
_CACHE_TTL_S = 30.0


def jwt_expiry(token: str) -> datetime | None:
    """The `exp` claim of a JWT, read without checking its signature; None if unreadable."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims: Any = orjson.loads(raw)
        return datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (ValueError, KeyError, TypeError, OverflowError, orjson.JSONDecodeError):
        return None


def token_expired(token: str, now: float | None = None) -> bool:
    exp = jwt_expiry(token)
    return exp is not None and exp.timestamp() <= (time.time() if now is None else now)


class NoToken(Exception):
    """A credential that has no usable token (expired, or its email cannot be renewed)."""


class Credentials:
    """Tokens by credential id, cached briefly; renews email credentials once at a time."""

    def __init__(self, pool: asyncpg.Pool, bakong: BakongClient) -> None:
        self.pool = pool
        self.bakong = bakong
        self.default_id: int | None = None
        self._cache: dict[int, tuple[float, Credential]] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def setup_default(self, token: str | None, email: str | None) -> None:
        """Store the configured default credential (BAKONG_TOKEN / BAKONG_EMAIL)."""
        if not (token or email):
            return
        cred = await store.upsert_credential(
            self.pool,
            token=token,
            email=email,
            expires_at=jwt_expiry(token) if token else None,
            is_default=True,
        )
        self.default_id = cred.id

    async def add(self, *, token: str | None, email: str | None) -> int:
        cred = await store.upsert_credential(
            self.pool, token=token, email=email, expires_at=jwt_expiry(token) if token else None
        )
        self._cache.pop(cred.id, None)
        return cred.id

    async def get(self, credential_id: int) -> Credential | None:
        hit = self._cache.get(credential_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        found = await store.credentials_by_id(self.pool, [credential_id])
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
        if cred is None:
            raise NoToken(f"credential {credential_id} not found")
        if cred.token and not token_expired(cred.token):
            return cred.token
        if cred.email:
            return await self.renew(credential_id, stale=cred.token)
        raise NoToken(f"credential {credential_id} has an expired token and no email")

    async def renew(self, credential_id: int, *, stale: str | None) -> str:
        """Renew through the credential's email, once even when many callers ask at once."""
        lock = self._locks.setdefault(credential_id, asyncio.Lock())
        async with lock:
            self._cache.pop(credential_id, None)
            cred = await self.get(credential_id)
            if cred is None or not cred.email:
                raise NoToken(f"credential {credential_id} cannot be renewed")
            if cred.token and cred.token != stale and not token_expired(cred.token):
                return cred.token  # another caller renewed it while we waited
            try:
                token = await self.bakong.renew_token(cred.email)
            except BakongError as exc:
                log.error(
                    "bakong token renewal failed",
                    extra={"credentialId": credential_id, "error": exc.kind},
                )
                raise NoToken(f"credential {credential_id}: renewal failed ({exc.kind})") from None
            await store.save_token(self.pool, credential_id, token, jwt_expiry(token))
            self._cache.pop(credential_id, None)
            log.info("bakong token renewed", extra={"credentialId": credential_id})
            return token
