"""Bench-only simulated Bakong: the package's sandbox plus a recorder of per-md5 check times.

Runs as its own process (`python bench/bakong.py --port N`). The recorder adds routes under
`/bench/` that the benchmark reads:

- `POST /bench/track {"md5s": [...]}`: md5s whose gaps between checks are measured; or
  `{"items": [[md5, born, until, since], ...]}` (epoch seconds): also when each was created
  (gaps are split by the md5's age, `?young=S` below), when its tracking ends (a check from
  then on is its last: it is final) and, for a new md5, when to count its first gap from;
- `POST /bench/window`: start a measuring window (gaps, request counts);
- `GET /bench/window[?young=S]`: the figures of the window so far; with `young`, also the
  gaps begun in the window split by the md5's age when each began (under S seconds or not),
  and those begun before the window (warm-up leftovers) apart;
- `GET /bench/paid`: when each md5 was marked paid (epoch seconds).
"""

from __future__ import annotations

import asyncio
import signal
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from procs import serve_main

from khqr_gateway.bakong.sandbox import create_sandbox_app

LIST_PATH = "/v1/check_transaction_by_md5_list"
SINGLE_PATH = "/v1/check_transaction_by_md5"
PAY_PREFIX = "/control/transactions/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorder:
    """Check times of tracked md5s and request counts, within a window the bench opens."""

    tracked: set[str] = field(default_factory=set)
    last: dict[str, float] = field(default_factory=dict)
    born: dict[str, float] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)
    paid_at: dict[str, float] = field(default_factory=dict)
    window_start: float = field(default_factory=time.time)
    gaps: array[float] = field(default_factory=lambda: array("d"))
    # The md5's age when each gap began (-1: not known).
    gap_ages: array[float] = field(default_factory=lambda: array("d"))
    gap_ends: array[float] = field(default_factory=lambda: array("d"))
    list_calls: int = 0
    single_calls: int = 0
    md5_checks: int = 0

    def start_window(self) -> None:
        self.window_start = time.time()
        self.gaps = array("d")
        self.gap_ages = array("d")
        self.gap_ends = array("d")
        self.list_calls = self.single_calls = self.md5_checks = 0

    def checked(self, md5s: list[str], now: float) -> None:
        self.md5_checks += len(md5s)
        for md5 in md5s:
            if md5 not in self.tracked:
                continue
            prev = self.last.get(md5)
            self.last[md5] = now
            if prev is not None:
                self.gaps.append(now - prev)
                self.gap_ages.append(prev - self.born[md5] if md5 in self.born else -1.0)
                self.gap_ends.append(now)
            if now >= self.until.get(md5, float("inf")):
                self.forget(md5)  # its final check: no longer pending

    def track(self, items: list[list[Any]]) -> None:
        for md5, born, until, since in items:
            md5 = md5.lower()
            self.tracked.add(md5)
            self.born[md5] = born
            self.until[md5] = until
            if since is not None:
                self.last[md5] = since

    def forget(self, md5: str) -> None:
        self.tracked.discard(md5)
        self.last.pop(md5, None)

    def paid(self, md5: str, now: float) -> None:
        self.paid_at[md5] = now
        self.forget(md5)

    def by_age(self, young_s: float) -> dict[str, Any]:
        """Gaps begun in the window, of md5s younger than `young_s` when they began and of
        the others; and the longest of the gaps begun before it (warm-up leftovers)."""
        young, old, before = [], [], []
        for gap, age, end in zip(self.gaps, self.gap_ages, self.gap_ends, strict=True):
            if end - gap < self.window_start:
                before.append(gap)
            elif 0 <= age < young_s:
                young.append(gap)
            else:
                old.append(gap)
        return {
            "youngGaps": summarize(young),
            "oldGaps": summarize(old),
            "gapsBegunBefore": summarize(before),
        }

    def figures(self, young_s: float | None = None) -> dict[str, Any]:
        now = time.time()
        elapsed = now - self.window_start
        # Time since the last check of each tracked md5: catches any md5 left unpolled,
        # which the completed gaps alone would hide.
        opened = {m: self.last.get(m, self.window_start) for m in self.tracked}
        open_gaps = [now - at for at in opened.values()]
        out = {
            "elapsedS": elapsed,
            "tracked": len(self.tracked),
            "listCalls": self.list_calls,
            "singleCalls": self.single_calls,
            "md5Checks": self.md5_checks,
            "gaps": summarize(list(self.gaps)),
            "openGaps": summarize(open_gaps),
        }
        if young_s is not None:
            out.update(self.by_age(young_s))
        return out


def summarize(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
    values.sort()
    n = len(values)

    def pct(p: float) -> float:
        return values[min(n - 1, int(p * n))]

    return {
        "count": n,
        "mean": sum(values) / n,
        "p50": pct(0.50),
        "p99": pct(0.99),
        "max": values[-1],
    }


RECORDER = web.AppKey("bench_recorder", Recorder)


@web.middleware
async def record_checks(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    path = request.path
    if path == LIST_PATH or path == SINGLE_PATH:
        recorder = request.app[RECORDER]
        body = await request.read()  # cached by the handler
        md5s = _md5s(body, many=path == LIST_PATH)
        if path == LIST_PATH:
            recorder.list_calls += 1
        else:
            recorder.single_calls += 1
        if response.status == 200:
            recorder.checked(md5s, time.time())
    elif path.startswith(PAY_PREFIX) and path.endswith("/pay") and response.status == 200:
        request.app[RECORDER].paid(request.match_info["md5"].lower(), time.time())
    return response


def _md5s(body: bytes, *, many: bool) -> list[str]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if many:
        if isinstance(value, dict):
            value = value.get("md5List")
        return [m.lower() for m in value if isinstance(m, str)] if isinstance(value, list) else []
    md5 = value.get("md5") if isinstance(value, dict) else None
    return [md5.lower()] if isinstance(md5, str) else []


async def track(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    recorder = request.app[RECORDER]
    recorder.tracked.update(m.lower() for m in body.get("md5s", ()))
    recorder.track(body.get("items", []))
    return web.json_response({"tracked": len(request.app[RECORDER].tracked)})


async def start_window(request: web.Request) -> web.Response:
    request.app[RECORDER].start_window()
    return web.json_response({"ok": True})


async def window(request: web.Request) -> web.Response:
    young = request.query.get("young")
    figures = request.app[RECORDER].figures(float(young) if young else None)
    return web.Response(body=orjson.dumps(figures), content_type="application/json")


async def paid(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[RECORDER].paid_at), content_type="application/json"
    )


def create_app() -> web.Application:
    app = create_sandbox_app()
    app.middlewares.append(record_checks)
    app[RECORDER] = Recorder()
    app.router.add_post("/bench/track", track)
    app.router.add_post("/bench/window", start_window)
    app.router.add_get("/bench/window", window)
    app.router.add_get("/bench/paid", paid)
    return app


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"bench bakong listening on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    serve_main(serve, __doc__)


if __name__ == "__main__":
    main()
