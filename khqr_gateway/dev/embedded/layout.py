"""Who runs the embedded servers (never root) and where their files live."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from khqr_gateway.dev.embedded.engines import EmbeddedError

# Postgres refuses to run as root: a root caller runs both servers as `postgres` if that
# user exists, else as this system user, created on first need.
SERVICE_USER = "khqr"


@dataclass(frozen=True)
class Account:
    """The unprivileged OS account a root caller runs the servers as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    data_dir: Path
    # Holds pg/ and redis/: the data dir itself, or a private dir under /var/tmp when the
    # data dir is out of the service account's reach (e.g. under a 0700 /root).
    server_dir: Path
    account: Account | None

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"


def prepare_layout(data_dir: Path, log: logging.Logger) -> Layout:
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
    return Layout(data_dir, server_dir.resolve(), account)


def _service_account(log: logging.Logger) -> Account | None:
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


def _lookup_account(name: str) -> Account | None:
    import pwd  # POSIX only, and only needed when running as root

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    return Account(name, entry.pw_uid, entry.pw_gid, groups)


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


def _reachable(path: Path, account: Account) -> bool:
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


def _fallback_dir(data_dir: Path, account: Account) -> Path:
    # /var/tmp survives reboots, /tmp often does not; one dir per data dir, by its hash.
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    path = base / f"khqr-{digest}"
    private_dir(path, account)
    return path


def private_dir(path: Path, account: Account | None) -> None:
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
