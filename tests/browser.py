"""A headless Chromium driven through the DevTools protocol, with aiohttp's websocket client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--remote-debugging-port=0",
)


def keep(path: Path, data: bytes) -> None:
    """Write a test artifact (a screenshot), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Browser:
    """A running Chromium: `port` serves the DevTools protocol."""

    process: subprocess.Popen[bytes]
    port: int
    browser_path: str

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.browser_path}"

    @contextlib.asynccontextmanager
    async def tab(self, downloads: Path | None = None) -> AsyncIterator[Tab]:
        """A fresh tab, closed afterwards; what it downloads lands in `downloads`."""
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.ws_url, max_msg_size=0) as ws:
                browser = Cdp(ws)
                if downloads is not None:
                    await browser.send(
                        "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads)
                    )
                target = await browser.send("Target.createTarget", url="about:blank")
                page_url = f"ws://127.0.0.1:{self.port}/devtools/page/{target['targetId']}"
                try:
                    async with session.ws_connect(page_url, max_msg_size=0) as page_ws:
                        tab = Tab(page_ws)
                        await tab.send("Runtime.enable")
                        await tab.send("Log.enable")
                        await tab.send("Page.enable")
                        yield tab
                finally:
                    await browser.send("Target.closeTarget", targetId=target["targetId"])


@contextlib.contextmanager
def launch(executable: str, timeout: float = 30.0) -> Iterator[Browser]:
    """Start Chromium with a fresh profile; stopped (and its profile removed) afterwards."""
    # Helpers may still be writing into the profile as they exit: never fail on its removal.
    with tempfile.TemporaryDirectory(
        prefix="khqr-chromium-", ignore_cleanup_errors=True
    ) as profile:
        # A session of its own: stopping it stops its helper processes too, and nothing else.
        process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port, path = _devtools_address(Path(profile), process, timeout)
            yield Browser(process, port, path)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def _devtools_address(
    profile: Path, process: subprocess.Popen[bytes], timeout: float
) -> tuple[int, str]:
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}")
        lines = active.read_text().split() if active.exists() else []
        if len(lines) == 2:
            return int(lines[0]), lines[1]
        time.sleep(0.05)
    raise RuntimeError("chromium did not open its DevTools port")


@dataclass
class Cdp:
    """Commands over one DevTools websocket; events that arrive meanwhile are kept."""

    ws: aiohttp.ClientWebSocketResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        command = {"id": message_id, "method": method, "params": params}
        await self.ws.send_str(orjson.dumps(command).decode())  # DevTools takes text frames only
        async with asyncio.timeout(15):
            while True:
                frame = await self.ws.receive()
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"DevTools connection ended: {frame.type.name}")
                message = orjson.loads(frame.data)
                if message.get("id") != message_id:
                    self.events.append(message)
                    continue
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result


class Tab(Cdp):
    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate until truthy (errors while a page loads count as not yet)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                last = await self.evaluate(expression)
                if last:
                    return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"never true: {expression} (last {last!r})")

    async def viewport(self, width: int, height: int, *, phone: bool) -> None:
        """Be a phone (touch, a device scale of 2) or a desktop window of this size."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=2 if phone else 1,
            mobile=phone,
        )
        await self.send("Emulation.setTouchEmulationEnabled", enabled=phone, maxTouchPoints=5)

    async def click(self, selector: str) -> None:
        """A real click (pressed and released at its centre), as a person's: a user gesture."""
        box = await self.wait_for(
            "(e => { if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return r.width > 0 && {x: r.x + r.width / 2, y: r.y + r.height / 2}; })"
            f"(document.querySelector({orjson.dumps(selector).decode()}))"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"],
                y=box["y"],
                button="left",
                clickCount=1,
            )

    async def screenshot(self, path: Path) -> bytes:
        """The tab as it looks now, as PNG bytes, also written to `path`."""
        shot = await self.send("Page.captureScreenshot", format="png")
        data = base64.b64decode(shot["data"])
        keep(path, data)
        return data

    def problems(self) -> list[str]:
        """Errors the page logged: CSP violations, uncaught exceptions, failed loads."""
        found = []
        for event in self.events:
            if event.get("method") == "Log.entryAdded":
                entry = event["params"]["entry"]
                if entry.get("level") == "error":
                    found.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
            elif event.get("method") == "Runtime.exceptionThrown":
                found.append(str(event["params"]["exceptionDetails"].get("text")))
        return found
