"""Command line: `khqr-gateway serve | migrate | sandbox | apps`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from khqr_gateway import __version__
from khqr_gateway.apps.model import KEY_DAYS_MAX
from khqr_gateway.config import ConfigError, Settings, load_settings
from khqr_gateway.logs import setup_logging

log = logging.getLogger("khqr_gateway")
T = TypeVar("T")


@contextlib.asynccontextmanager
async def _storage(settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """The configured Postgres and Redis, or private embedded ones for a first run."""
    if settings.database_url and settings.redis_url:
        yield settings.database_url, settings.redis_url
        return
    from khqr_gateway.dev.embedded import EmbeddedServices

    embedded = EmbeddedServices(
        settings.data_dir,
        need_postgres=settings.database_url is None,
        need_redis=settings.redis_url is None,
        log=log,
    )
    urls = await embedded.start()
    try:
        database_url = settings.database_url or urls.database_url
        redis_url = settings.redis_url or urls.redis_url
        assert database_url and redis_url
        yield database_url, redis_url
    finally:
        await embedded.stop()


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting at once")
            os._exit(130)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, on_signal, signum)


async def serve(settings: Settings, sockets: list[socket.socket]) -> None:
    from khqr_gateway.http.app import create_app
    from khqr_gateway.http.server import serve_app

    stop = asyncio.Event()
    _install_signals(stop)
    async with _storage(settings) as (database_url, redis_url):
        app = create_app(settings, database_url=database_url, redis_url=redis_url)
        runner = await serve_app(
            app,
            settings.host,
            settings.port,
            shutdown_timeout=settings.shutdown_grace_s,
            sockets=sockets,
        )
        _log_listening(settings)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def _log_listening(settings: Settings) -> None:
    from khqr_gateway.http.dashboard import enabled

    base = (settings.public_url or local_url(settings.host, settings.port)).rstrip("/")
    dashboard = f"{base}/queue" if enabled(settings) else "off (production without API_KEY)"
    log.info(
        "khqr-gateway %s listening on http://%s:%d (%s); API docs %s/reference, dashboard %s",
        __version__,
        settings.host,
        settings.port,
        settings.app_env.value,
        base,
        dashboard,
    )


def local_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens to reach host:port."""
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def migrate(settings: Settings) -> None:
    import asyncpg

    from khqr_gateway.infra import db

    async with _storage(settings) as (database_url, _):
        conn = await asyncpg.connect(database_url)
        try:
            applied = await db.migrate(conn)
        finally:
            await conn.close()
    log.info("migrations applied: %s", ", ".join(applied) or "none (up to date)")


async def apps(settings: Settings, args: argparse.Namespace) -> int:
    """`apps create NAME`, `apps list`, `apps key NAME`: for an operator with a shell and no
    admin key yet. A key and a webhook secret are printed once, never stored in clear."""
    import asyncpg

    from khqr_gateway.infra import db

    async with _storage(settings) as (database_url, _):
        conn = await asyncpg.connect(database_url)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            return await _apps_command(pool, args)
        finally:
            await pool.close()


async def _apps_command(pool: Any, args: argparse.Namespace) -> int:
    from khqr_gateway.apps.model import AppError, app_name

    if args.apps_command == "list":
        await _apps_list(pool)
        return 0
    try:
        name = app_name(args.name)
    except AppError as exc:
        print(f"khqr-gateway: {exc}", file=sys.stderr)
        return 2
    if args.apps_command == "create":
        return await _apps_create(pool, name)
    return await _apps_key(pool, name, args.expires_in_days)


async def _apps_list(pool: Any) -> None:
    from khqr_gateway.apps import store as app_store

    counts = await app_store.usable_key_counts(pool)
    print(f"{'ID':<26} {'NAME':<24} {'KEYS':>4}  {'CREATED':<16}  STATUS")
    after: str | None = None
    while page := await app_store.list_page(pool, after=after, limit=500):
        for app in page:
            created = app.created_at.strftime("%Y-%m-%d %H:%M") if app.created_at else ""
            status = "disabled" if app.disabled else "active"
            keys = counts.get(app.id, 0)
            print(f"{app.id:<26} {app.name:<24} {keys:>4}  {created:<16}  {status}")
        after = page[-1].id


async def _apps_create(pool: Any, name: str) -> int:
    from khqr_gateway.apps import store as app_store

    if await app_store.find(pool, name) is not None:
        print(
            f"khqr-gateway: an app named {name!r} exists: `apps key {name}` makes it a key",
            file=sys.stderr,
        )
        return 1
    app, key, secret = await app_store.create(pool, name)
    print(f"app {app.id} ({app.name}) created")
    print(f"API key, shown once: {key.key}")
    print(f"webhook secret, shown once: {secret}")
    return 0


async def _apps_key(pool: Any, name: str, expires_in_days: int | None) -> int:
    from datetime import UTC, datetime, timedelta

    from khqr_gateway.apps import store as app_store

    app = await app_store.find(pool, name)
    if app is None or app.disabled:
        print(f"khqr-gateway: no enabled app has the id or name {name!r}", file=sys.stderr)
        return 1
    if app.default:
        print("khqr-gateway: the default app's keys are API_KEY's; set it there", file=sys.stderr)
        return 1
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    key = await app_store.add_key(pool, app.id, expires_at=expires)
    until = f", expires {expires.isoformat(timespec='seconds')}" if expires else ""
    print(f"key {key.id} for app {app.id} ({app.name}){until}")
    print(f"API key, shown once: {key.key}")
    return 0


async def sandbox(settings: Settings, sockets: list[socket.socket], port: int) -> None:
    from khqr_gateway.bakong.sandbox import create_sandbox_app

    stop = asyncio.Event()
    _install_signals(stop)
    runner = web.AppRunner(create_sandbox_app(), access_log=None)
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock).start()
    log.info("simulated Bakong listening on http://%s:%d", settings.host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="khqr-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gateway (API, polling, webhooks)")
    commands.add_parser("migrate", help="apply database migrations and exit")
    box = commands.add_parser("sandbox", help="run the simulated Bakong on its own port")
    box.add_argument("--port", type=int, default=None, help="port (default: PORT or 3001)")
    apps = commands.add_parser("apps", help="create and list apps, make API keys")
    verbs = apps.add_subparsers(dest="apps_command", required=True)
    verbs.add_parser(
        "create", help="a new app, with its first key and webhook secret"
    ).add_argument("name")
    verbs.add_parser("list", help="every app, with how many usable keys it has")
    key = verbs.add_parser("key", help="a new API key for an app (id or name)")
    key.add_argument("name")
    key.add_argument("--expires-in-days", type=_positive_days, default=None)
    return parser


def _positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if not 1 <= days <= KEY_DAYS_MAX:
        raise argparse.ArgumentTypeError(f"a whole number of days from 1 to {KEY_DAYS_MAX}")
    return days


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _bind(command: str, host: str, port: int) -> list[socket.socket] | None:
    """The listening sockets, or None after one line saying why there are none."""
    from khqr_gateway.http.server import bind

    try:
        return bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            change = "--port or PORT" if command == "sandbox" else "PORT"
            why = (
                f"port {port} is already in use on {host or '*'} (another khqr-gateway?): "
                f"stop it, or set {change} to a free port"
            )
        else:
            why = f"cannot listen on {host or '*'} port {port}: {exc.strerror or exc}"
        print(f"khqr-gateway: {why}", file=sys.stderr)
        return None


def _warn(settings: Settings) -> None:
    if settings.production and not settings.webhook_secrets:
        log.warning("WEBHOOK_SECRET is not set: webhooks are sent unsigned")
    if settings.production and not settings.api_keys:
        log.warning("API_KEY is not set: the API is open to anyone who can reach it")
    if not settings.sandbox and not (settings.bakong_token or settings.bakong_email):
        log.warning(
            "BAKONG_TOKEN and BAKONG_EMAIL are not set: a transaction that brings no token "
            "or email of its own is refused (422), and /ready says degraded"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"khqr-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if args.command == "migrate":
        _run(migrate(settings))
        return 0
    if args.command == "apps":
        return _run(apps(settings, args))
    port = settings.port
    if args.command == "sandbox":
        port = args.port or (settings.port if "PORT" in os.environ else 3001)
    # Before anything starts: a second process on a taken port must run no tick.
    sockets = _bind(args.command, settings.host, port)
    if sockets is None:
        return 1
    if args.command == "sandbox":
        _run(sandbox(settings, sockets, port))
    else:
        _warn(settings)
        _run(serve(settings, sockets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
