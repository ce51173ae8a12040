"""Figure 9: the capacity seed polled direct, then through BAKONG_PROXY_URL (proxy.py)."""

# Not bench/proxy.py: that would read as proxy.py itself, which `python -m proxy` runs.

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
import time
from typing import Any

from harness import HOST, Bench, div, free_port
from procs import CpuMeter


async def start_proxy(b: Bench, password: str) -> str:
    """proxy.py on loopback with a password, as tests/bakong/test_client.py runs it; its URL."""
    port = free_port()
    command = [sys.executable, "-m", "proxy", "--hostname", HOST, "--port", str(port)]
    command += ["--basic-auth", f"shop:{password}", "--num-workers", "1", "--num-acceptors", "1"]
    b.procs.start("proxy", command, cwd=b.work)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            break
        except OSError:
            if b.procs.running["proxy"].poll() is not None or time.monotonic() > deadline:
                tail = b.procs.log_tail("proxy")
                raise RuntimeError(f"proxy.py did not start:\n{tail}") from None
            await asyncio.sleep(0.1)
    return f"http://shop:{password}@{HOST}:{port}"


async def bakong_latency(side: Bench) -> tuple[float, int]:
    """The gateway's Bakong call latency so far (seconds in all, calls), from /metrics."""
    async with side.http.get(side.url("gateway") + "/metrics") as resp:
        text = await resp.text()
    total, count = 0.0, 0
    for line in text.splitlines():
        if line.startswith("khqr_bakong_call_seconds_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("khqr_bakong_call_seconds_count{"):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


async def poll_window(b: Bench) -> dict[str, Any]:
    """The seed polled for `proxy_s`: Bakong requests, gaps, latency and CPU per request."""
    await b.bakong_post("/bench/window", {})
    stats_before = await b.bakong_get("/control/stats")
    latency_before = await bakong_latency(b)
    meter = b.meter()
    before, started = meter.read(), time.perf_counter()
    await asyncio.sleep(b.scale.proxy_s)
    window = await b.bakong_get("/bench/window")
    cpu = CpuMeter.cores(before, meter.read(), time.perf_counter() - started)
    seconds = time.perf_counter() - started
    latency = await bakong_latency(b)
    stats = await b.bakong_get("/control/stats")
    requests = window["listCalls"] + window["singleCalls"]
    calls = latency[1] - latency_before[1]
    per_request = seconds / requests if requests else None
    return {
        "requests": requests,
        "md5_checks": window["md5Checks"],
        # Of every call the simulated Bakong answered meanwhile (token renewals too).
        "calls": sum(stats["calls"].values()) - sum(stats_before["calls"].values()),
        "proxied": stats["proxied"] - stats_before["proxied"],
        "gap": window["gaps"],
        "latency_ms": div((latency[0] - latency_before[0]) * 1000, calls),
        "gateway_us_per_request": _mul(cpu.get("gateway"), per_request, 1e6),
        "proxy_us_per_request": _mul(cpu.get("proxy"), per_request, 1e6),
        "cpu_cores": cpu,
    }


def _mul(*values: float | None) -> float | None:
    out = 1.0
    for v in values:
        if v is None:
            return None
        out *= v
    return out


async def phase_proxy(b: Bench) -> None:
    """The capacity seed polled by one gateway direct, then through BAKONG_PROXY_URL
    (proxy.py, with a password): what the proxy costs a Bakong request."""
    s = b.scale
    if not b.seed:
        await b.seed_pending(s.pending)
        await asyncio.sleep(s.warmup_s)
    b.procs.stop("gateway-2")
    direct = await poll_window(b)
    url = await start_proxy(b, secrets.token_urlsafe(12))
    b.procs.stop("gateway")
    b.extra_env["BAKONG_PROXY_URL"] = url
    await b.start_gateway("gateway")
    await asyncio.sleep(min(s.warmup_s, 2 * s.interval_s))
    proxied = await poll_window(b)
    b.results["proxy"] = {"pending": len(b.seed), "direct": direct, "proxied": proxied}
