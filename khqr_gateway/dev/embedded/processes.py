"""The servers' child processes: spawned to die with us, started on a free port, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from khqr_gateway.dev.embedded.engines import EmbeddedError
from khqr_gateway.dev.embedded.layout import Account

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_PR_SET_PDEATHSIG = 1
# Log lines that mean "try again": a port taken since we picked it, or a previous
# server of the same dir (or its orphaned backends) not quite gone yet.
_RETRYABLE = ("already in use", "already exists")


@dataclass
class Child:
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


def spawn(
    argv: list[str],
    *,
    cwd: Path,
    log_path: Path,
    account: Account | None,
    stop_signals: tuple[signal.Signals, ...],
) -> Child:
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
    return Child(proc, stop_signals)


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


async def run_until_ready(
    launch: Callable[[int], Child],
    ready: Callable[[Child, int], Awaitable[bool]],
    log_path: Path,
    name: str,
) -> int:
    """Starts a server on a free port and waits until it answers; returns the port."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        port = _free_port()
        child = launch(port)
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


def holds_dir(pid: int, directory: Path) -> bool:
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


async def stop_foreign(pid: int, directory: Path, signals: tuple[signal.Signals, ...]) -> None:
    """Stops a server a previous run left on `directory` and that no longer answers."""
    for sig in signals:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not holds_dir(pid, directory):
                return
            await asyncio.sleep(0.1)
