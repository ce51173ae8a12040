"""App values: keys as DESIGN.md says (kgw_, 32+ url-safe characters, shown once), names."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest

from khqr_gateway.apps.model import (
    ApiKey,
    App,
    AppError,
    app_name,
    key_hash,
    looks_like_key,
    new_app_id,
    new_key,
    new_webhook_secret,
)
from khqr_gateway.deliveries.signing import parse_secrets

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_key_is_kgw_and_at_least_32_url_safe_characters_each_time_new() -> None:
    keys = [new_key() for _ in range(200)]
    for made in keys:
        assert re.fullmatch(r"kgw_[A-Za-z0-9_-]{32,}", made.key)
        assert re.fullmatch(r"key_[A-Za-z0-9_-]+", made.id)
        assert looks_like_key(made.key)
    assert len({k.key for k in keys}) == 200 and len({k.id for k in keys}) == 200


def test_what_is_kept_of_a_key_cannot_show_it() -> None:
    made = new_key()
    assert made.key not in repr(made)
    assert made.hash == key_hash(made.key) and len(made.hash) == 32
    assert made.key.encode() not in made.hash
    # The shown prefix is 4 random characters: not enough to guess the other 39.
    assert made.prefix == made.key[:8] and made.key.startswith(made.prefix)


def test_an_app_repr_never_shows_its_bot_token() -> None:
    app = App(id=new_app_id(), name="shop", telegram_bot_token="123:secret-bot-token")
    assert "secret-bot-token" not in repr(app)


def test_a_webhook_secret_is_one_the_signer_accepts() -> None:
    secret = new_webhook_secret()
    (key,) = parse_secrets(secret)
    assert len(key) == 32 and base64.b64decode(secret.removeprefix("whsec_")) == key


@pytest.mark.parametrize(
    ("key", "usable"),
    [
        (ApiKey("key_a", "app_x", "kgw_abcd", NOW), True),
        (ApiKey("key_a", "app_x", "kgw_abcd", NOW, expires_at=NOW + timedelta(seconds=1)), True),
        (ApiKey("key_a", "app_x", "kgw_abcd", NOW, expires_at=NOW), False),
        (ApiKey("key_a", "app_x", "kgw_abcd", NOW, revoked_at=NOW - timedelta(days=1)), False),
    ],
)
def test_a_key_works_until_it_expires_or_is_revoked(key: ApiKey, usable: bool) -> None:
    assert key.usable(NOW) is usable


def test_an_api_key_from_the_environment_is_not_taken_for_a_made_one() -> None:
    assert not looks_like_key("my-shared-secret-key")
    assert not looks_like_key("kgw_short")


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("x" * 101, "at most 100"),
        ("shop\x00", "control characters"),
        ("shop\nPOS", "control characters"),
    ],
)
def test_a_bad_name_is_refused_naming_why(given: str, error: str) -> None:
    with pytest.raises(AppError, match=error):
        app_name(given)


def test_a_name_is_trimmed_and_may_be_khmer() -> None:
    assert app_name("  ហាងកាហ្វេ  ") == "ហាងកាហ្វេ"
