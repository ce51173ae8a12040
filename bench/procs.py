"""Child processes of the bench, and what /proc says about them (CPU time, peak memory)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Procs:
    """Every process the bench starts, each logging to its own file; all stopped at the end."""

    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        log.close()
        self.running[name] = proc
        return proc

    def kill9(self, name: str) -> None:
        proc = self.running.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.running.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM to all at once (a second one would make the gateway exit at once)."""
        for proc in self.running.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.running.clear()

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far; 0 once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                found.append(int(entry))
        except OSError:
            continue
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS


def memory_kib(pid: int, key: str = "VmHWM") -> int | None:
    """A memory figure of /proc/PID/status in KiB: VmHWM is the peak RSS so far."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class CpuMeter:
    """CPU used by each named part of the system between two readings, in cores."""

    pids: dict[str, list[int]]
    database: str

    def read(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        # Only the backends serving the bench's database: other users share this Postgres.
        ours = [p for p in pids_named("postgres") if self.database in _cmdline(p)]
        now["postgres"] = sum(cpu_seconds(p) for p in ours)
        now["redis"] = sum(cpu_seconds(p) for p in pids_named("redis-server"))
        now["machine"] = machine_busy_seconds()
        return now

    @staticmethod
    def cores(
        before: dict[str, float], after: dict[str, float], seconds: float
    ) -> dict[str, float]:
        # max(0, ...): a process that exits in between takes its CPU time with it.
        used = {k: round(max(0.0, after[k] - before.get(k, 0.0)) / seconds, 3) for k in after}
        # What the machine did besides the processes above: wrk (gone before it can be
        # read), other users, the kernel.
        used["rest"] = round(used["machine"] - sum(v for k, v in used.items() if k != "machine"), 3)
        return used


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def serve_main(serve: Callable[[str, int], Coroutine[Any, Any, None]], about: str | None) -> None:
    """The command line of a bench server (the simulated Bakong, the receiver): --host and
    --port, on uvloop when it is installed."""
    parser = argparse.ArgumentParser(description=about)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents.setdefault(int(raw.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found
