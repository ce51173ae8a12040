"""Apps as values: ids, API keys (made, shown once, kept as a hash) and webhook secrets (pure)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypedDict

DEFAULT_APP_ID = "app_default"
APP_ID_PREFIX = "app_"
KEY_ID_PREFIX = "key_"
KEY_PREFIX = "kgw_"
# 32 random bytes: 43 url-safe characters, past DESIGN.md's "at least 32".
KEY_RANDOM_BYTES = 32
# What a list shows of a key: the prefix and 4 random characters, never enough to guess it.
KEY_SHOWN_CHARS = len(KEY_PREFIX) + 4
WEBHOOK_SECRET_BYTES = 32
NAME_MAX = 100
# How long a made key may be given to live: ten years, past which "expires" means nothing.
KEY_DAYS_MAX = 3650


class AppError(ValueError):
    """A value an app cannot have; the message names the field and says why."""


@dataclass(frozen=True, slots=True)
class Merchant:
    """The merchant profile `POST /api/v1/khqr` encodes into a QR."""

    account_id: str
    merchant_name: str
    merchant_city: str


@dataclass(frozen=True, slots=True)
class App:
    id: str
    name: str
    webhook_url: str | None = None
    merchant: Merchant | None = None
    credential_id: int | None = None
    telegram_chat_id: str | None = None
    # A secret: kept out of repr so that no log line or traceback shows it.
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_language: str = "en"  # en or km: the words of its Telegram notices
    rate_limit: int | None = None
    disabled_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    @property
    def default(self) -> bool:
        return self.id == DEFAULT_APP_ID


class AppChanges(TypedDict, total=False):
    """The settings an update sets, by column; a column left out keeps its value, None clears it."""

    name: str
    webhook_url: str | None
    merchant: Merchant | None
    credential_id: int | None
    telegram_chat_id: str | None
    telegram_bot_token: str | None
    telegram_language: str
    rate_limit: int | None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as stored: what it belongs to and when it works; never the key itself."""

    id: str
    app_id: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request acts for: the app, and by which key (for logs and rate limits).

    `key_id` is a made key's id (`key_...`), `env:` or `admin:` and a digest prefix for a key
    of the environment, or None when the default app is open (no API_KEY set). `app` is the
    app's row when it was looked up (a made key, or an admin key naming an app).
    """

    app_id: str
    key_id: str | None = None
    admin: bool = False
    app: App | None = None


OPEN = Caller(DEFAULT_APP_ID)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: the only moment its text exists outside the caller's hands."""

    id: str
    key: str = field(repr=False)

    @property
    def hash(self) -> bytes:
        return key_hash(self.key)

    @property
    def prefix(self) -> str:
        return self.key[:KEY_SHOWN_CHARS]


def new_app_id() -> str:
    return APP_ID_PREFIX + secrets.token_urlsafe(15)


def new_key() -> NewKey:
    return NewKey(
        id=KEY_ID_PREFIX + secrets.token_urlsafe(12),
        key=KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES),
    )


def key_hash(key: str) -> bytes:
    """What is stored of a key, and what a presented key is looked up by."""
    return hashlib.sha256(key.encode()).digest()


def looks_like_key(text: str) -> bool:
    """A key made by the gateway (an `API_KEY` from the environment can be any text)."""
    return text.startswith(KEY_PREFIX) and len(text) >= len(KEY_PREFIX) + 32


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(WEBHOOK_SECRET_BYTES)).decode()


def app_name(value: str) -> str:
    """A name as stored: trimmed, 1 to 100 characters, no control characters."""
    name = value.strip()
    if not name:
        raise AppError("name: must not be empty")
    if len(name) > NAME_MAX:
        raise AppError(f"name: at most {NAME_MAX} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise AppError("name: must not contain control characters")
    return name
