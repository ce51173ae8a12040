"""Schemathesis against our own /openapi.json: no server error, no answer that breaks the spec.

The real process (development mode, the in-process sandbox Bakong, real Postgres and Redis)
is fuzzed from the spec it serves, with an admin key (the app routes too) and a fixed seed:
every operation (HEAD included) through the examples, coverage and fuzzing phases, each run
once to its end (25 fuzzed cases an operation), then the stateful phase (links from one
answer to the next request, over kept-alive connections) for a time budget: it is the one
phase that finds more the longer it runs (links its scenarios reach). Reproduce by hand
against a running `khqr-gateway serve` (ADMIN_API_KEY set, API_RATE_LIMIT=0):

    SCHEMATHESIS_HOOKS=tests/scenarios/schemathesis_hooks.py \\
    KHQR_WEBHOOK_SINK=http://127.0.0.1:3000/sandbox/control/inbox/st \\
    .venv/bin/st --config-file tests/scenarios/schemathesis.toml \\
        run http://127.0.0.1:3000/openapi.json -H "Authorization: Bearer $ADMIN_API_KEY" \\
        --checks not_a_server_error,status_code_conformance,content_type_conformance,\\
    response_schema_conformance,response_headers_conformance \\
        --phases stateful --max-examples 25 --max-time 20 --seed 1

(and `--phases examples,coverage,fuzzing` without `--max-time` for the first run).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import REDIS_URL, secret
from tests.test_cli import ROOT, Proc, log_lines, start

pytestmark = pytest.mark.slow

ST = Path(sys.executable).with_name("st")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
CONFIG = Path(__file__).with_name("schemathesis.toml")
# What a server must get right whatever it is sent. Left out on purpose:
# positive_data_acceptance and negative_data_rejection, because some rules cannot be
# said in a schema (a cursor must be one we issued, `until` after `since`, a credential
# needs token or email, a jobId must exist), so schema-valid requests are rightly refused;
# the stateful checks (use_after_free, ensure_resource_availability, ignored_auth, ...)
# need to know what each operation means.
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    )
)
SEED = 1
MAX_EXAMPLES = 25
# What the first run may take before it counts as hung (it needs about 25 s on 2 cores).
FIRST_RUN_LIMIT_S = 240
# The stateful phase's budget: on 2 cores it reaches 6-8 of the 14 links in 15-20 s.
STATEFUL_TIME_S = 20
TAIL_LINES = 80
ERROR = 50  # pino's level number


async def _fuzz(
    proc: Proc, api_key: str, cwd: Path, phases: str, *, max_time_s: int | None, limit_s: float
) -> tuple[int, str]:
    """One `st run`; with `max_time_s`, its elastic phases repeat until that budget is spent,
    without it each phase runs once. `limit_s` is how long before it counts as hung."""
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(HOOKS),
        "KHQR_WEBHOOK_SINK": f"{proc.url}/sandbox/control/inbox/schemathesis",
        "PYTHONPATH": str(ROOT),
    }
    budget = ["--max-time", str(max_time_s)] if max_time_s is not None else []
    st = await asyncio.create_subprocess_exec(
        str(ST),
        "--config-file",
        str(CONFIG),
        "run",
        f"{proc.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {api_key}",
        "--checks",
        CHECKS,
        "--phases",
        phases,
        "--max-examples",
        str(MAX_EXAMPLES),
        *budget,
        "--seed",
        str(SEED),
        # A stream that never ends fails the run instead of hanging it.
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--no-color",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(st.communicate(), limit_s)
    finally:
        if st.returncode is None:
            st.kill()
            await st.wait()
    assert st.returncode is not None
    return st.returncode, output.decode(errors="replace")


def _scenarios(report: str) -> int:
    """How many stateful scenarios the report says ran."""
    found = re.search(r"Scenarios:\s+(\d+)", report)
    return int(found.group(1)) if found else 0


def _links(report: str) -> int:
    """How many API links the stateful scenarios followed, by the report."""
    found = re.search(r"API Links:\s+(\d+) covered", report)
    return int(found.group(1)) if found else 0


def _errors(output: str) -> list[str]:
    """Error lines of the gateway's own: a failed tick answers no request, so only its log
    tells. aiohttp's parser logs the fuzzer's malformed requests (a NUL in a header), which
    it answers 400 itself before any of our code runs: not ours."""
    return [
        line["msg"]
        for line in log_lines(output)
        if line["level"] >= ERROR and not line["msg"].startswith("Error handling request")
    ]


async def test_the_api_keeps_to_its_own_openapi_spec(
    tmp_path: Path, database_url: str, namespace: str, pg: asyncpg.Connection
) -> None:
    default_key = secret("st-api-key-" + secrets.token_hex(12))
    # What the fuzzer sends: an admin key, which reaches the app routes too (and acts for the
    # default app on the others).
    api_key = secret("st-admin-key-" + secrets.token_hex(12))
    env = {
        "APP_ENV": "development",  # with no BAKONG_* set: the in-process sandbox Bakong
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": namespace,
        "API_KEY": default_key,
        "ADMIN_API_KEY": api_key,
        "API_RATE_LIMIT": "0",  # the fuzzer's pace is not abuse; 429 stays in the spec
        # Only a transaction given a short timeoutSeconds ends (and sends a webhook) in the run.
        "POLL_TIMEOUT_S": "3600",
        "LOG_LEVEL": "error",
        "DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(ROOT),
    }
    proc = await start(env, tmp_path)
    try:
        await proc.wait_ready()
        # Read the log as it comes, so that a chatty run never blocks the gateway on its pipe.
        log = asyncio.create_task(proc.read_all())
        started = time.monotonic()
        code, report = await _fuzz(
            proc,
            api_key,
            tmp_path,
            "examples,coverage,fuzzing",
            max_time_s=None,
            limit_s=FIRST_RUN_LIMIT_S,
        )
        stateful_code, stateful = await _fuzz(
            proc,
            api_key,
            tmp_path,
            "stateful",
            max_time_s=STATEFUL_TIME_S,
            limit_s=STATEFUL_TIME_S + 60,
        )
        took = time.monotonic() - started
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.proc.wait(), 20) == 0
        output = await log
    finally:
        if proc.proc.returncode is None:
            proc.proc.kill()
            await proc.proc.wait()
    tail = "\n".join(report.splitlines()[-TAIL_LINES:])
    assert code == 0, f"schemathesis found problems (exit {code}):\n{tail}"
    tail = "\n".join(stateful.splitlines()[-TAIL_LINES:])
    assert stateful_code == 0, f"the stateful phase found problems (exit {stateful_code}):\n{tail}"
    scenarios = _scenarios(stateful)
    assert scenarios > 0, f"the stateful phase ran nothing:\n{tail}"
    links = _links(stateful)
    assert links > 0, f"the stateful phase followed no link:\n{tail}"
    assert not _errors(output), _errors(output)
    assert api_key not in output and default_key not in output
    # The hooks kept every webhook on this host: no URL the fuzzer made up was stored.
    urls = [r["webhook_url"] for r in await pg.fetch("select webhook_url from transactions")]
    assert all(url.startswith(proc.url) for url in urls), urls[:5]
    print(
        f"schemathesis: {took:.1f} s, {scenarios} stateful scenarios, {links} links,"
        f" {len(urls)} transactions"
    )
