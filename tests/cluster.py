"""A real local Redis Cluster for the suite: 6 redis-server processes in cluster mode, 3
masters and 3 replicas, made with `redis-cli --cluster create` (Debian's redis-server)."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# Short, so that a replica takes over a killed master within a few seconds.
NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """`count` ports whose cluster bus ports (+10000) are free too."""
    found: list[int] = []
    candidate = 17000 + (int(time.time() * 1000) % 2000) * 2
    while len(found) < count:
        candidate += 1
        if candidate > 19999:
            candidate = 17000
        if _free(candidate) and _free(candidate + 10000):
            found.append(candidate)
    return found


@dataclass
class Cluster:
    """The nodes by port; any of them is the cluster's address."""

    folder: Path
    ports: list[int]
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        """Start (or restart, with its nodes.conf: it rejoins) the node on `port`."""
        log = open(self.folder / f"redis-{port}.log", "ab")
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica takes over however long it was cut off from its master
                "--cluster-replica-validity-factor", "0",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.wait_answering(port)

    def wait_answering(self, port: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while self.cli(port, "ping") != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {port} did not start")
            time.sleep(0.05)

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def master_of(self, key: str) -> int:
        """The port of the master that serves `key`'s slot now."""
        slot = int(self.cli(self.alive()[0], "cluster", "keyslot", key))
        for line in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for span in parts[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(parts[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no master serves slot {slot}")

    def alive(self) -> list[int]:
        return [p for p in self.ports if p in self.procs]

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says the cluster is ok and agrees on one master per shard."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [self.cli(p, "cluster", "info") for p in self.alive()]
            if all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok: {states}")
            time.sleep(0.1)

    def wait_taken_over(self, key: str, old: int, timeout_s: float = 30) -> int:
        """Until a replica serves `key`'s slot in place of the master on `old`; its port."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                now = self.master_of(key)
            except RuntimeError:
                now = old
            if now != old:
                self.wait_ok(max(1.0, deadline - time.monotonic()))
                return now
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {old}")
            time.sleep(0.1)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


def start(folder: Path) -> Cluster:
    """Six nodes, then `redis-cli --cluster create` with a replica per master."""
    folder.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(folder, _ports(6))
    try:
        for port in cluster.ports:
            cluster.start_node(port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in cluster.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        cluster.wait_ok()
    except BaseException:
        cluster.stop()
        raise
    return cluster
