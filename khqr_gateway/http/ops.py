"""Operations routes: /health, /ready, /metrics and /api/v1/stats."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from aiohttp_apigami import docs, response_schema
from marshmallow import Schema, fields
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from khqr_gateway.credentials import store as credential_store
from khqr_gateway.credentials.model import Credential, CredentialStatus, refused
from khqr_gateway.http.errors import ApiError
from khqr_gateway.http.json import iso, json_response
from khqr_gateway.http.openapi import errors
from khqr_gateway.http.request import app_of
from khqr_gateway.infra import db
from khqr_gateway.metrics import REGISTRY
from khqr_gateway.service import FIGURES_INTERVAL_S, SERVICE_KEY, Service


class HealthSchema(Schema):
    status = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(
        required=True, metadata={"description": "ok, degraded (still 200) or unavailable (503)"}
    )
    checks = fields.Dict(keys=fields.String(), values=fields.String())
    tickErrors = fields.Dict(keys=fields.String(), values=fields.String())
    bakong = fields.Dict(
        metadata={
            "description": "defaultCredential, expiredCredentials (ids), circuits (open "
            "breakers by credential id), checks (how this process checks md5s: `mode` "
            "`list`, 50 a call, or `single`, one call each while Bakong refuses the default "
            "credential's list endpoint, asked again in `listRetryInS`; `singleCredentials`: "
            "how many credentials are checked one call each; `budget`: the pending counts "
            "and the gaps between checks of young and older md5s that fit BAKONG_MAX_RPS) and "
            "`problem` when the default credential is expired or missing, or Bakong refuses "
            "every call"
        }
    )


class StatsSchema(Schema):
    transactions = fields.Dict(keys=fields.String(), values=fields.Integer())
    deliveries = fields.Dict(keys=fields.String(), values=fields.Integer())
    queues = fields.Dict(keys=fields.String(), values=fields.Integer())
    pollLagSeconds = fields.Float()
    oldestPendingSeconds = fields.Float(allow_none=True)
    latePayments = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={"description": "Payments found after a timeout or a cancel, by status"},
    )
    asOf = fields.DateTime(
        metadata={"description": "When the counts, queues and ages above were read"}
    )
    bakong = fields.Dict(
        metadata={
            "description": "Recent call outcomes, circuits (open breakers) and checks (the "
            "check mode and budget, as in /ready)"
        }
    )
    inFlightDeliveries = fields.Integer()


@docs(tags=["operations"], summary="The process is alive")
@response_schema(HealthSchema, 200)
async def health(request: web.Request) -> web.Response:
    """GET /health: the process is alive."""
    return json_response({"status": "ok"})


async def _check(aw: Awaitable[object]) -> str:
    try:
        await asyncio.wait_for(aw, timeout=2)
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


@docs(
    tags=["operations"],
    summary="Ready: Postgres, Redis and the scheduler",
    description="503 when Postgres, Redis or the ticks are down. An expired default Bakong "
    "credential, or none at all (neither `BAKONG_TOKEN` nor `BAKONG_EMAIL` set, outside "
    "sandbox mode), makes `status` `degraded` (still 200: restarting or rerouting cannot fix "
    "a token, and everything else still works); `bakong.problem` says what to do and "
    "`bakong` which credentials are expired. "
    "A token-only default that Bakong refused (401) before its `exp` is asked about again "
    "with backoff: `degraded` lasts only while Bakong refuses it.",
    responses={503: {"description": "Not ready", "schema": ReadySchema}},
)
@response_schema(ReadySchema, 200)
async def ready(request: web.Request) -> web.Response:
    """GET /ready: Postgres, Redis and the ticks; 503 with details when any is down."""
    service = request.app[SERVICE_KEY]
    checks = {
        "postgres": await _check(db.ping(service.pool)),
        "redis": await _check(service.redis.ping()),
        "scheduler": "ok" if service.ticking else "stale",
    }
    ok = all(v == "ok" for v in checks.values())
    details: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
    tick_errors = service.tick_errors()
    if tick_errors:
        details["tickErrors"] = tick_errors
    if checks["postgres"] == "ok":
        details["bakong"] = await bakong_health(service)
        if ok and details["bakong"].get("problem"):
            details["status"] = "degraded"
    return json_response(details, 200 if ok else 503)


EXPIRED_SHOWN = 20


async def bakong_health(service: Service) -> dict[str, Any]:
    """The default credential, expired ones and open circuits; `problem` if the default is
    expired or missing (readiness stays 200: restarting cannot fix a token)."""
    default_id = service.credentials.default_id
    found = await credential_store.credentials_by_id(
        service.pool, [default_id] if default_id else []
    )
    default = found.get(default_id) if default_id else None
    # Readiness is the operator's: every app's expired credentials.
    expired = await credential_store.list_credentials(
        service.pool, None, status=CredentialStatus.EXPIRED, limit=EXPIRED_SHOWN + 1
    )
    health: dict[str, Any] = {
        "defaultCredential": None
        if default is None
        else {
            "id": default.id,
            "status": default.status,
            "expiresAt": iso(default.expires_at),
            "lastError": default.last_error,
        },
        "expiredCredentials": [c.id for c in expired[:EXPIRED_SHOWN]],
        "moreExpired": len(expired) > EXPIRED_SHOWN,
        "circuits": service.bakong_circuits(),
        "checks": service.check_modes(),
    }
    problems = []
    if default is not None and default.status == "expired":
        problems.append(_problem(default))
    elif default is None and not service.settings.sandbox:
        problems.append(NO_DEFAULT)
    refused_s = service.bakong_refused_s()
    if refused_s is not None:
        problems.append(
            f"Bakong has answered 403 to every call for {refused_s:.0f} s. It refuses hosts "
            "outside Cambodia: run the gateway there, or set BAKONG_PROXY_URL to an http(s) "
            "proxy in Cambodia."
        )
    if problems:
        health["problem"] = " ".join(problems)
    return health


NO_DEFAULT = (
    "no default Bakong credential: neither BAKONG_TOKEN nor BAKONG_EMAIL is set, so every "
    "transaction that brings no token or email of its own is refused (422). Set BAKONG_TOKEN "
    "or BAKONG_EMAIL (a registered email renews the token by itself) and restart."
)


def _problem(default: Credential) -> str:
    if refused(default):
        return (
            f"Bakong refuses the token of the default Bakong credential ({default.id}) "
            f"({default.last_error}); it is asked again with backoff and is active again once "
            "Bakong accepts it. Meanwhile its transactions wait, and time out as "
            "bakong_unauthorized past their deadline and grace. POST /api/v1/credentials a "
            "fresh token or a registered email to replace it."
        )
    return (
        f"the default Bakong credential ({default.id}) has no usable token "
        f"({default.last_error}); transactions that use it will time out as "
        "bakong_unauthorized. POST /api/v1/credentials a fresh token or a registered email."
    )


@docs(
    tags=["operations"],
    summary="Prometheus metrics",
    description="Queue depths, poll lag and pending transactions are as the figures tick "
    f"last read them (every {FIGURES_INTERVAL_S:g} s): a scrape costs no query.",
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, from this process's registry alone."""
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@docs(
    tags=["operations"],
    summary="Queue and status figures",
    description="The counts and the oldest pending age are the calling app's; queues, poll lag, "
    "Bakong and in-flight deliveries are the gateway's. "
    "Counts, queues, poll lag and the oldest pending age are as the figures tick "
    f"last read them (`asOf`, every {FIGURES_INTERVAL_S:g} s), so that polling this costs no "
    "query; Bakong figures and in-flight deliveries are live. 503 `figures_pending` for the "
    "moment after start-up before the first read.",
    responses=errors(401, 503),
)
@response_schema(StatsSchema, 200)
async def stats(request: web.Request) -> web.Response:
    """GET /api/v1/stats: transactions and deliveries by status, queues, lag, Bakong errors."""
    service = request.app[SERVICE_KEY]
    figures = service.figures
    if figures is None:
        raise ApiError(
            503,
            "figures_pending",
            "the counts have not been read yet; try again in a few seconds",
            headers={"Retry-After": str(math.ceil(FIGURES_INTERVAL_S))},
        )
    # The counts are the caller's app's; queues, lag and Bakong are the gateway's own.
    mine, oldest = figures.of(app_of(request))
    body = {
        "transactions": mine["transactions"],
        "deliveries": mine["deliveries"],
        "queues": figures.queues,
        "pollLagSeconds": figures.poll_lag_s,
        "oldestPendingSeconds": round(oldest, 3) if oldest else None,
        "latePayments": mine["late"],
        "asOf": iso(figures.read_at),
        "bakong": {
            **service.bakong_calls(),
            "circuits": service.bakong_circuits(),
            "checks": service.check_modes(),
        },
        "inFlightDeliveries": service.in_flight_deliveries,
    }
    return json_response(body)
