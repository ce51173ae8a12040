"""The real process: zero-config first run, pino log lines, no secrets in them, clean SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.http_exceptions import BadHttpMessage

from khqr_gateway.bakong.sandbox import make_token
from khqr_gateway.logs import pino_handler
from tests.conftest import REDIS_URL, SimulatedBakong

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-api-key-" + secrets.token_hex(12)
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.output = b""

    async def wait_ready(self, timeout: float = 30) -> float:
        start = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - start < timeout:
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {await self.read_all()}")
                try:
                    async with http.get(f"{self.url}/ready") as resp:
                        if resp.status == 200:
                            return time.monotonic() - start
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("never became ready")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self.read_all()
        return code

    async def read_all(self) -> str:
        assert self.proc.stdout is not None
        self.output += await self.proc.stdout.read()
        return self.output.decode(errors="replace")


async def start(
    env: dict[str, str], cwd: Path, command: str = "serve", port: int | None = None
) -> Proc:
    port = port or free_port()
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "REDIS_URL", "BAKONG_", "API_KEY", "APP_ENV"))
    }
    full.update({"PORT": str(port), "HOST": "127.0.0.1", **env})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "khqr_gateway",
        command,
        cwd=cwd,
        env=full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return Proc(proc, port)


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


def log_lines(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]


async def test_first_run_with_nothing_configured_works(tmp_path: Path, procs: list[Proc]) -> None:
    env = {"DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    proc = await start(env, tmp_path)
    procs.append(proc)
    took = await proc.wait_ready()
    async with aiohttp.ClientSession() as http:
        md5 = secrets.token_hex(16)
        hook = f"{proc.url}/sandbox/control/inbox/first-run"
        async with http.post(
            f"{proc.url}/api/v1/transactions", json={"md5": md5, "webhookUrl": hook}
        ) as r:
            assert r.status == 201
        async with http.post(
            f"{proc.url}/sandbox/control/transactions/{md5}/pay", json={"amount": 1}
        ) as r:
            assert r.status == 200
        deadline = time.monotonic() + 10
        inbox: list[Any] = []
        while time.monotonic() < deadline and not inbox:
            async with http.get(hook) as r:
                inbox = await r.json()
            await asyncio.sleep(0.2)
    assert inbox and inbox[0]["body"]["status"] == "success"
    assert await proc.stop() == 0
    output = await proc.read_all()
    assert "SANDBOX MODE" in output
    assert "embedded Postgres" in output
    print(f"first run: ready in {took:.2f} s")


async def test_logs_are_pino_lines_without_secrets_and_sigterm_is_clean(
    tmp_path: Path, procs: list[Proc], database_url: str
) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.secret-signature-part"
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": "cli-" + secrets.token_hex(4),
        "API_KEY": API_KEY,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BAKONG_BASE_URL": "http://127.0.0.1:9",
        "BAKONG_TOKEN": token,
        "APP_ENV": "production",
        "PYTHONPATH": str(ROOT),
    }
    proc = await start(env, tmp_path)
    procs.append(proc)
    await proc.wait_ready()
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {API_KEY}", "x-request-id": "req-1"}
        body = {
            "md5": secrets.token_hex(16),
            "webhookUrl": "https://example.com/hook",
            "token": token,
        }
        async with http.post(f"{proc.url}/api/v1/transactions", json=body, headers=headers) as r:
            assert r.status in (201, 422)
            text = await r.text()
        async with http.get(f"{proc.url}/api/v1/transactions", headers=headers) as r:
            listing = await r.text()
    started = time.monotonic()
    assert await proc.stop() == 0
    assert time.monotonic() - started < 12
    output = await proc.read_all()
    for secret in (API_KEY, WEBHOOK_SECRET, token, token.split(".")[2]):
        assert secret not in output, "a secret reached the logs"
        assert secret not in text and secret not in listing, "a secret reached a response"
    lines = log_lines(output)
    assert lines, output
    for line in lines:
        assert {"level", "time", "pid", "hostname", "msg"} <= set(line)
        assert isinstance(line["level"], int) and isinstance(line["time"], int)
    requests = [line for line in lines if line["msg"] == "request"]
    assert any(r["requestId"] == "req-1" and r["method"] == "POST" for r in requests)
    assert any("shutting down" in line["msg"] for line in lines)
    [listening] = [line["msg"] for line in lines if "listening on" in line["msg"]]
    assert f"{proc.url}/reference" in listening and f"{proc.url}/queue" in listening


def test_aiohttp_log_lines_lose_what_the_client_sent() -> None:
    """Defence in depth: aiohttp's own lines quote request lines, query strings and
    header lines; formatted as in production, they keep aiohttp's words only."""
    token = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9." + secrets.token_hex(12)
    stream = io.StringIO()
    handler = pino_handler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    server = logging.getLogger("aiohttp.server")
    try:
        raise BadHttpMessage(f"Invalid header token:\n\n  b'Authorization: Bearer {token}\\x01'")
    except BadHttpMessage:
        server.exception("Error handling request from %s", "127.0.0.1")
    try:
        raise ValueError(f"bad url /api/v1/transaction/x/md5?token={token}")
    except ValueError:
        server.exception("Error handling request")
    logging.getLogger("aiohttp.access").warning('"GET /x/md5?token=%s HTTP/1.1" 400', token)
    logging.getLogger("khqr_gateway").info("still ours: ?kept=1")
    root.removeHandler(handler)
    lines = log_lines(stream.getvalue())
    assert len(lines) == 4
    assert token not in stream.getvalue()
    assert token[:20] not in stream.getvalue()
    assert lines[0]["msg"] == "Error handling request from 127.0.0.1"
    assert "BadHttpMessage" in lines[0]["exc_info"]
    assert "ValueError" in lines[1]["exc_info"]
    assert lines[3]["msg"] == "still ours: ?kept=1"


async def test_serve_answers_an_unparseable_request_line_as_json_and_logs_no_token(
    tmp_path: Path, procs: list[Proc], database_url: str
) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9." + secrets.token_hex(12)
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": "cli-" + secrets.token_hex(4),
        "BAKONG_BASE_URL": "http://127.0.0.1:9",
        "LOG_LEVEL": "debug",
        "PYTHONPATH": str(ROOT),
    }
    proc = await start(env, tmp_path)
    procs.append(proc)
    await proc.wait_ready()
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    md5 = secrets.token_hex(16)
    writer.write(f"GET /api/v1/transaction/{md5}/md5?token={token}\t HTTP/1.1\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert await proc.stop() == 0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400"
    assert b"application/json" in head
    assert orjson.loads(body)["error"]["code"] == "bad_request"
    assert token not in answer.decode()
    output = await proc.read_all()
    assert "unparseable request" in output
    assert token not in output and token[:24] not in output


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another process already listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


async def test_serve_on_a_taken_port_says_so_in_one_line_and_starts_nothing(
    tmp_path: Path,
    procs: list[Proc],
    database_url: str,
    pg: asyncpg.Connection,
    bakong: SimulatedBakong,
) -> None:
    # A token that is due for renewal: a token tick that ran would renew it at once.
    soon = make_token("shop@example.com", exp=int(time.time()) + 3600)
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": "cli-" + secrets.token_hex(4),
        "BAKONG_BASE_URL": bakong.url,
        "BAKONG_TOKEN": soon,
        "BAKONG_EMAIL": "shop@example.com",
        "PYTHONPATH": str(ROOT),
    }
    with taken_port() as port:
        proc = await start(env, tmp_path, port=port)
        procs.append(proc)
        code = await asyncio.wait_for(proc.proc.wait(), 30)
    lines = (await proc.read_all()).strip().splitlines()
    assert code == 1
    assert len(lines) == 1, lines
    assert f"port {port}" in lines[0] and "already in use" in lines[0], lines[0]
    assert soon not in lines[0]
    assert bakong.state.calls["renew_token"] == 0, "no tick ran"
    assert await pg.fetchval("select count(*) from credentials") == 0, "nothing started"


async def test_sandbox_on_a_taken_port_says_so_in_one_line(
    tmp_path: Path, procs: list[Proc]
) -> None:
    with taken_port() as port:
        proc = await start({"PYTHONPATH": str(ROOT)}, tmp_path, command="sandbox", port=port)
        procs.append(proc)
        code = await asyncio.wait_for(proc.proc.wait(), 30)
    lines = (await proc.read_all()).strip().splitlines()
    assert code == 1
    assert len(lines) == 1, lines
    assert f"port {port}" in lines[0] and "already in use" in lines[0], lines[0]


async def cli(database_url: str, *argv: str) -> tuple[int, str, str]:
    """`khqr-gateway <argv>` against this session's Postgres: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
    env |= {"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "LOG_LEVEL": "warn"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "khqr_gateway",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_an_operator_with_a_shell_makes_an_app_and_its_keys(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """`apps create`, `apps key`, `apps list`: each key and the secret printed once, and only
    their hashes (never the text) kept in Postgres."""
    code, out, _ = await cli(database_url, "apps", "create", "Coffee Shop")
    assert code == 0, out
    app_id = out.split()[1]
    first = out.split("API key, shown once: ")[1].split()[0]
    secret = out.split("webhook secret, shown once: ")[1].split()[0]
    assert app_id.startswith("app_") and first.startswith("kgw_") and secret.startswith("whsec_")

    code, out, _ = await cli(database_url, "apps", "key", "coffee shop", "--expires-in-days", "30")
    assert code == 0 and app_id in out and "expires 20" in out
    second = out.split("API key, shown once: ")[1].split()[0]
    assert second.startswith("kgw_") and second != first

    code, listing, _ = await cli(database_url, "apps", "list")
    row = next(line for line in listing.splitlines() if line.startswith(app_id))
    assert row.split()[1:4] == ["Coffee", "Shop", "2"] and row.endswith("active")
    assert any(line.startswith("app_default") for line in listing.splitlines())
    assert first not in listing and second not in listing and secret not in listing

    stored = await pg.fetchval(
        "select string_agg(k::text || encode(k.key_hash, 'escape'), '') from api_keys k"
    )
    assert first not in stored and second not in stored
    assert await pg.fetchval("select count(*) from api_keys where app_id = $1", app_id) == 2


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["apps", "key", "nobody"], 1, "no enabled app has the id or name 'nobody'"),
        (["apps", "create", "  "], 2, "name: must not be empty"),
        (["apps", "key", "x", "--expires-in-days", "0"], 2, "a whole number of days"),
    ],
)
async def test_apps_commands_refuse_what_they_cannot_do_in_one_line(
    database_url: str, pg: asyncpg.Connection, argv: list[str], code: int, says: str
) -> None:
    got, out, err = await cli(database_url, *argv)
    assert got == code and says in err and "Traceback" not in err + out
    assert await pg.fetchval("select count(*) from api_keys") == 0


async def test_a_second_app_of_the_same_name_is_refused(
    database_url: str, pg: asyncpg.Connection
) -> None:
    assert (await cli(database_url, "apps", "create", "POS"))[0] == 0
    code, out, err = await cli(database_url, "apps", "create", "pos")
    assert code == 1 and "an app named 'pos' exists" in err and "kgw_" not in out
    assert await pg.fetchval("select count(*) from apps where lower(name) = 'pos'") == 1
