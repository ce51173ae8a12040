"""Load generation for the bench: wrk when installed (C, light on a 2-core machine), else aiohttp.

Both report the same `LoadResult`. Each POST carries a fresh md5 so that every request creates
a transaction (201), as a real ingest burst would.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"status":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""

# Each thread makes md5s from the run's seed, its own number and a counter: unique, 32 hex.
_POST = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  seed = args[1]
  hook = args[2]
  token = args[3]
  if token == "" then token = nil end
  keys = {}
  for key in string.gmatch(args[4] or "", "[^,]+") do keys[#keys + 1] = key end
  n = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  n = n + 1
  local md5 = string.format("%s%02x%014x", seed, tid, n)
  local headers = nil
  if #keys > 0 then
    -- Each request with the next app's key: the lookups spread over every app.
    headers = {["Content-Type"] = "application/json",
               ["Authorization"] = "Bearer " .. keys[(n + tid) % #keys + 1]}
  end
  local body
  if token then
    body = '{"md5":"' .. md5 .. '","webhookUrl":"' .. hook .. '","token":"' .. token .. '"}'
  else
    body = '{"md5":"' .. md5 .. '","webhookUrl":"' .. hook ..
        '","metadata":{"orderId":"' .. n .. '"}}'
  end
  return wrk.format(nil, nil, headers, body)
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    tool: str
    requests: int
    errors: int
    duration_s: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def rps(self) -> float:
        # wrk counts socket errors apart from requests: never below zero.
        ok = max(0, self.requests - self.errors)
        return ok / self.duration_s if self.duration_s else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def md5_seed() -> str:
    """16 hex characters: the run's part of every md5 that a load makes."""
    return secrets.token_hex(8)


async def run(
    url: str,
    *,
    seconds: float,
    connections: int,
    tool: str,
    post_hook: str | None = None,
    threads: int = 2,
    token: str | None = None,
    keys: Sequence[str] = (),
) -> LoadResult:
    """GET `url` (post_hook None) or POST new transactions to it, for `seconds`; with a
    `token`, each body is that of rachhen/khqr-webhook's route: md5, webhookUrl, token; with
    `keys`, each request presents the next of them as its API key."""
    if tool == "wrk":
        return await _wrk(url, seconds, connections, post_hook, threads, token, keys)
    return await _aiohttp(url, seconds, connections, post_hook, token, keys)


async def _wrk(
    url: str,
    seconds: float,
    connections: int,
    post_hook: str | None,
    threads: int,
    token: str | None,
    keys: Sequence[str] = (),
) -> LoadResult:
    binary = wrk_path()
    assert binary, "wrk is not installed"
    script = (_POST if post_hook else "") + _DONE
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    args = [
        binary,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        f.name,
        url,
    ]
    if post_hook:
        args += ["--", md5_seed(), post_hook, token or "", ",".join(keys)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    finally:
        os.unlink(f.name)
    line = next((x for x in out.decode().splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.decode()[-500:]}")
    data: dict[str, Any] = orjson.loads(line[len("WRKJSON ") :])
    errors = sum(data[k] for k in ("status", "connect", "read", "write", "timeout"))
    return LoadResult(
        "wrk",
        int(data["requests"]),
        int(errors),
        data["duration_us"] / 1e6,
        data["p50_us"] / 1000,
        data["p99_us"] / 1000,
    )


def _body(seed: str, counter: int, post_hook: str, token: str | None) -> bytes:
    body: dict[str, Any] = {"md5": f"{seed}{counter:016x}", "webhookUrl": post_hook}
    if token:
        body["token"] = token
    else:
        body["metadata"] = {"orderId": str(counter)}
    return orjson.dumps(body)


async def _aiohttp(
    url: str,
    seconds: float,
    connections: int,
    post_hook: str | None,
    token: str | None,
    keys: Sequence[str] = (),
) -> LoadResult:
    seed = md5_seed()
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            start = time.perf_counter()
            try:
                if post_hook:
                    body = _body(seed, counter, post_hook, token)
                    sent = headers
                    if keys:
                        sent = {**headers, "Authorization": f"Bearer {keys[counter % len(keys)]}"}
                    async with session.post(url, data=body, headers=sent) as resp:
                        await resp.read()
                        ok = resp.status < 300
                else:
                    async with session.get(url) as resp:
                        await resp.read()
                        ok = resp.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    duration = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return LoadResult(
        "aiohttp",
        n,
        errors,
        duration,
        latencies[n // 2] * 1000 if n else None,
        latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
    )
