"""Bakong credentials as values: a token, an email or both, and the rules of their expiry (pure)."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson


class CredentialStatus(StrEnum):
    """Whether a credential's token may be used: `expired` says why not in `last_error`."""

    ACTIVE = "active"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Credential:
    id: int
    token: str | None
    email: str | None
    expires_at: datetime | None
    status: CredentialStatus
    is_default: bool = False
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


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


def expiry_seconds(credential: Credential, now: float | None = None) -> float | None:
    """Seconds the credential's token has left; 0 or less when it cannot be used."""
    now = time.time() if now is None else now
    left = credential.expires_at.timestamp() - now if credential.expires_at else None
    if credential.status is CredentialStatus.EXPIRED or credential.token is None:
        return min(left, 0.0) if left is not None else 0.0
    return left


def _usable(credential: Credential | None, stale: str | None) -> str | None:
    """The credential's token if it is active, unexpired and not the one found wanting."""
    if (
        credential is None
        or credential.status is not CredentialStatus.ACTIVE
        or not credential.token
    ):
        return None
    if credential.token == stale or token_expired(credential.token):
        return None
    return credential.token


def refused(credential: Credential) -> bool:
    """Expired only because Bakong refused its token, whose `exp` is still ahead, and
    there is no email to renew it: Bakong may accept the token again."""
    return (
        credential.status is CredentialStatus.EXPIRED
        and credential.token is not None
        and not credential.email
        and not token_expired(credential.token)
    )
