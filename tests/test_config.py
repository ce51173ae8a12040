"""Settings from the environment: defaults, aliases, and one clear line per bad value."""

from __future__ import annotations

import pytest

from khqr_gateway.config import AppEnv, ConfigError, load_settings


def load(**env: str):  # type: ignore[no-untyped-def]
    return load_settings(env, env_file=None)


def test_defaults_need_nothing_configured() -> None:
    s = load()
    assert s.app_env is AppEnv.DEVELOPMENT
    assert s.port == 3000
    assert s.poll_interval_s == 3.0
    assert s.poll_timeout_s == 300
    assert s.webhook_timeout_s == 15.0
    assert s.webhook_retry_schedule == (5, 30, 120, 600, 3600)
    assert s.sandbox, "development with no Bakong configured runs the simulated Bakong"
    assert (s.retention_days, s.attempt_body_days) == (180, 30)


def test_any_bakong_setting_turns_sandbox_off() -> None:
    assert not load(BAKONG_TOKEN="t").sandbox
    assert not load(BAKONG_EMAIL="a@b.kh").sandbox
    assert not load(BAKONG_BASE_URL="http://127.0.0.1:9").sandbox
    assert not load(APP_ENV="production").sandbox


def test_node_env_is_an_alias_and_app_env_wins() -> None:
    assert load(NODE_ENV="production").app_env is AppEnv.PRODUCTION
    assert load(NODE_ENV="production", APP_ENV="stage").app_env is AppEnv.STAGE


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("APP_ENV", "prod"),
        ("POLL_INTERVAL_S", "0"),
        ("POLL_TIMEOUT_S", "0"),
        ("DATABASE_URL", "mysql://x"),
        ("REDIS_URL", "http://x"),
        ("WEBHOOK_SECRET", "whsec_short"),
        ("WEBHOOK_SECRET", "not-a-secret"),
        ("WEBHOOK_RETRY_SCHEDULE", "5,abc"),
        ("WEBHOOK_TIMEOUT_S", "-1"),
        ("API_KEY", "short"),
        ("ALLOW_PRIVATE_WEBHOOK_URLS", "maybe"),
        ("LOG_LEVEL", "loud"),
        ("KHQR_APP_ICON_URL", "icon.png"),
        ("KHQR_APP_NAME", "x" * 65),
        ("RETENTION_DAYS", "-1"),
        ("RETENTION_DAYS", "half a year"),
        ("ATTEMPT_BODY_DAYS", "1.5"),
        ("REDIS_CLUSTER", "maybe"),
        ("REDIS_CLUSTER", "true"),  # without REDIS_URL: the embedded Redis is no cluster
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message
    if name == "WEBHOOK_SECRET":
        assert value not in message, "a secret is never echoed"


def test_the_deep_links_app_is_read() -> None:
    s = load(KHQR_APP_NAME="Noodle Bar", KHQR_APP_ICON_URL="https://noodle.example/i.png")
    assert (s.khqr_app_name, s.khqr_app_icon_url) == ("Noodle Bar", "https://noodle.example/i.png")


def test_secrets_are_not_in_repr() -> None:
    s = load(
        API_KEY="a" * 32, BAKONG_TOKEN="tok-secret-value", WEBHOOK_SECRET="whsec_" + "QUFB" * 8
    )
    assert "a" * 32 not in repr(s) and "tok-secret-value" not in repr(s)
    assert len(s.webhook_secrets) == 1 and len(s.webhook_secrets[0]) == 24


def test_env_file_is_read_and_environment_wins(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=4000\nPOLL_INTERVAL_S=2\n")
    s = load_settings({"PORT": "5000"}, env_file=env_file)
    assert s.port == 5000
    assert s.poll_interval_s == 2.0


def test_cli_stops_with_one_line_on_bad_config(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from khqr_gateway.cli import main

    monkeypatch.setenv("PORT", "nope")
    monkeypatch.chdir("/")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "PORT" in err


def test_telegram_settings_and_their_bad_values() -> None:
    s = load(
        TELEGRAM_BOT_TOKEN="123:abc",
        TELEGRAM_CHAT_ID="-100",
        TELEGRAM_API_URL="http://127.0.0.1:9/",
        TELEGRAM_LANGUAGE="km",
    )
    assert (s.telegram_api_url, s.telegram_chat_id, s.telegram_language) == (
        "http://127.0.0.1:9",
        "-100",
        "km",
    )
    assert "123:abc" not in repr(s)
    assert load().telegram_api_url == "https://api.telegram.org"
    for name, value in (("TELEGRAM_LANGUAGE", "fr"), ("TELEGRAM_API_URL", "ftp://x")):
        with pytest.raises(ConfigError, match=name):
            load(**{name: value})


def test_redis_cluster_names_a_node_through_redis_url() -> None:
    assert not load(REDIS_URL="redis://r:6379/0").redis_cluster
    assert load(REDIS_URL="redis://r:6379/0", REDIS_CLUSTER="true").redis_cluster
