"""Settings: one frozen object built from the environment (and `.env`) at start-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from dotenv import dotenv_values

from khqr_gateway.deliveries.retry import DEFAULT_SCHEDULE, parse_schedule
from khqr_gateway.deliveries.signing import SecretError, parse_secrets
from khqr_gateway.notices.model import LANGUAGES
from khqr_gateway.transactions.model import LateWindow

PRODUCTION_BAKONG_URL = "https://api-bakong.nbc.gov.kh"
# What the Bakong app shows as the app that sent the payer (deep links).
APP_NAME_MAX = 64
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "silent")

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that is missing or wrong; the message names the variable."""


class AppEnv(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"
    TEST = "test"
    STAGE = "stage"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment, validated once."""

    app_env: AppEnv = AppEnv.DEVELOPMENT
    host: str = "0.0.0.0"
    port: int = 3000
    database_url: str | None = None
    redis_url: str | None = None
    redis_namespace: str = "khqr"
    redis_cluster: bool = False  # REDIS_URL names a node of a Redis Cluster
    api_keys: tuple[str, ...] = ()
    admin_api_keys: tuple[str, ...] = ()
    bakong_base_url: str | None = None
    bakong_token: str | None = None
    bakong_email: str | None = None
    poll_interval_s: float = 3.0
    poll_timeout_s: int = 300
    webhook_secrets: tuple[bytes, ...] = field(default=(), repr=False)
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    webhook_timeout_s: float = 15.0
    log_level: str = "info"
    bakong_renew_before_days: int = 7
    bakong_max_rps: float = 50.0
    bakong_grace_s: int = 60
    bakong_timeout_s: float = 10.0
    allow_private_webhook_urls: bool = False
    khqr_account_id: str | None = None
    khqr_merchant_name: str | None = None
    khqr_merchant_city: str | None = None
    khqr_app_name: str | None = None
    khqr_app_icon_url: str | None = None
    data_dir: Path = Path(".khqr-data")
    shutdown_grace_s: float = 10.0
    public_url: str | None = None
    api_rate_limit: int = 1000
    bakong_proxy_url: str | None = field(default=None, repr=False)
    late_check_interval_s: float = 30.0
    late_margin_s: int = 60
    late_watch_s: int = 3600
    telegram_api_url: str = "https://api.telegram.org"
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_chat_id: str | None = None
    telegram_alert_chat_id: str | None = None
    telegram_language: str = "en"
    retention_days: int = 180  # 0 keeps every transaction
    attempt_body_days: int = 30  # 0 keeps every attempt's response body
    # How long an app's replaced webhook secret signs beside its new one (not from the
    # environment: DESIGN.md sets 24 h; tests shorten it).
    secret_overlap_s: float = 86400.0

    @property
    def sandbox(self) -> bool:
        """True when the simulated Bakong is mounted in-process (development, nothing set)."""
        return self.app_env is AppEnv.DEVELOPMENT and not (
            self.bakong_base_url or self.bakong_token or self.bakong_email
        )

    @property
    def production(self) -> bool:
        return self.app_env is AppEnv.PRODUCTION

    @property
    def late_window(self) -> LateWindow:
        return LateWindow(self.late_margin_s, self.late_watch_s, self.late_check_interval_s)

    @property
    def bakong_url(self) -> str:
        return (self.bakong_base_url or PRODUCTION_BAKONG_URL).rstrip("/")

    def __repr__(self) -> str:  # never print secrets, even by accident
        return f"Settings(app_env={self.app_env.value!r}, port={self.port}, sandbox={self.sandbox})"


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Build settings from `environ` (default os.environ) over the values of `env_file`."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return _build(_Reader(merged))


class _Reader:
    """Reads typed values from a string mapping; every error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def parse(self, name: str, convert: Callable[[str], T], default: T) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return convert(value)
        except (ValueError, SecretError) as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def number(self, name: str, default: float, low: float, high: float) -> float:
        def convert(value: str) -> float:
            number = float(value)
            if not low <= number <= high:
                raise ValueError(f"must be between {low:g} and {high:g}, got {value!r}")
            return number

        return self.parse(name, convert, default)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        def convert(value: str) -> int:
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"must be a whole number, got {value!r}") from None
            if not low <= number <= high:
                raise ValueError(f"must be between {low} and {high}, got {value}")
            return number

        return self.parse(name, convert, default)

    def flag(self, name: str, default: bool) -> bool:
        def convert(value: str) -> bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"must be true or false, got {value!r}")

        return self.parse(name, convert, default)


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def convert(value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.hostname or parts.path):
            raise ValueError(f"must be a {' or '.join(schemes)} URL")
        return value

    return convert


def _app_env(value: str) -> AppEnv:
    try:
        return AppEnv(value.lower())
    except ValueError:
        allowed = ", ".join(e.value for e in AppEnv)
        raise ValueError(f"must be one of {allowed}, got {value!r}") from None


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


def _api_keys(value: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    if any(len(k) < 16 for k in keys):
        raise ValueError("each key must be at least 16 characters")
    return keys


def _app_name(value: str) -> str:
    if len(value) > APP_NAME_MAX:
        raise ValueError(f"must be at most {APP_NAME_MAX} characters")
    return value


def _namespace(value: str) -> str:
    if not value.replace("-", "").replace("_", "").isalnum():
        raise ValueError("may hold only letters, digits, '-' and '_'")
    return value


def _language(value: str) -> str:
    if value not in LANGUAGES:
        raise ValueError("must be " + " or ".join(LANGUAGES))
    return value


def _cluster(r: _Reader) -> bool:
    cluster = r.flag("REDIS_CLUSTER", False)
    if cluster and r.raw("REDIS_URL") is None:
        # The embedded Redis is one server: a cluster has to be named.
        raise ConfigError("REDIS_CLUSTER: needs REDIS_URL, the address of any node of the cluster")
    return cluster


def _build(r: _Reader) -> Settings:
    env_name = "APP_ENV" if r.raw("APP_ENV") else "NODE_ENV"
    pg = ("postgres", "postgresql")
    return Settings(
        app_env=r.parse(env_name, _app_env, AppEnv.DEVELOPMENT),
        host=r.raw("HOST") or "0.0.0.0",
        port=r.integer("PORT", 3000, 1, 65535),
        database_url=r.parse("DATABASE_URL", _url(pg), None),
        redis_url=r.parse("REDIS_URL", _url(("redis", "rediss", "unix")), None),
        redis_namespace=r.parse("REDIS_NAMESPACE", _namespace, "khqr"),
        redis_cluster=_cluster(r),
        api_keys=r.parse("API_KEY", _api_keys, ()),
        admin_api_keys=r.parse("ADMIN_API_KEY", _api_keys, ()),
        bakong_base_url=r.parse("BAKONG_BASE_URL", _url(("http", "https")), None),
        bakong_token=r.raw("BAKONG_TOKEN"),
        bakong_email=r.raw("BAKONG_EMAIL"),
        poll_interval_s=r.number("POLL_INTERVAL_S", 3.0, 0.1, 300),
        poll_timeout_s=r.integer("POLL_TIMEOUT_S", 300, 1, 3600),
        webhook_secrets=r.parse("WEBHOOK_SECRET", parse_secrets, ()),
        webhook_retry_schedule=r.parse("WEBHOOK_RETRY_SCHEDULE", parse_schedule, DEFAULT_SCHEDULE),
        webhook_timeout_s=r.number("WEBHOOK_TIMEOUT_S", 15.0, 0.1, 120),
        log_level=r.parse("LOG_LEVEL", _log_level, "info"),
        bakong_renew_before_days=r.integer("BAKONG_RENEW_BEFORE_DAYS", 7, 1, 89),
        bakong_max_rps=r.number("BAKONG_MAX_RPS", 50.0, 0.1, 10_000),
        bakong_grace_s=r.integer("BAKONG_GRACE_S", 60, 0, 3600),
        bakong_timeout_s=r.number("BAKONG_TIMEOUT_S", 10.0, 0.5, 60),
        allow_private_webhook_urls=r.flag("ALLOW_PRIVATE_WEBHOOK_URLS", False),
        khqr_account_id=r.raw("KHQR_ACCOUNT_ID"),
        khqr_merchant_name=r.raw("KHQR_MERCHANT_NAME"),
        khqr_merchant_city=r.raw("KHQR_MERCHANT_CITY"),
        khqr_app_name=r.parse("KHQR_APP_NAME", _app_name, None),
        khqr_app_icon_url=r.parse("KHQR_APP_ICON_URL", _url(("https", "http")), None),
        data_dir=Path(r.raw("DATA_DIR") or ".khqr-data"),
        shutdown_grace_s=r.number("SHUTDOWN_GRACE_S", 10.0, 0, 600),
        public_url=r.parse("PUBLIC_URL", _url(("http", "https")), None),
        api_rate_limit=r.integer("API_RATE_LIMIT", 1000, 0, 1_000_000),
        bakong_proxy_url=r.parse("BAKONG_PROXY_URL", _url(("http", "https")), None),
        late_check_interval_s=r.number("LATE_CHECK_INTERVAL_S", 30.0, 0.1, 3600),
        late_margin_s=r.integer("LATE_MARGIN_S", 60, 0, 86_400),
        late_watch_s=r.integer("LATE_WATCH_S", 3600, 0, 7 * 86_400),
        telegram_api_url=r.parse(
            "TELEGRAM_API_URL", _url(("http", "https")), "https://api.telegram.org"
        ).rstrip("/"),
        telegram_bot_token=r.raw("TELEGRAM_BOT_TOKEN"),
        telegram_chat_id=r.raw("TELEGRAM_CHAT_ID"),
        telegram_alert_chat_id=r.raw("TELEGRAM_ALERT_CHAT_ID"),
        telegram_language=r.parse("TELEGRAM_LANGUAGE", _language, "en"),
        retention_days=r.integer("RETENTION_DAYS", 180, 0, 36_500),
        attempt_body_days=r.integer("ATTEMPT_BODY_DAYS", 30, 0, 36_500),
    )
