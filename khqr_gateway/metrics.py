"""Prometheus metrics: one registry per process, every metric named once here."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# The only values of a `credential` label. Every distinct per-transaction token is a
# credential of its own, so a label per credential id would be a series per merchant token.
DEFAULT_CREDENTIAL = "default"
PER_TRANSACTION = "per_transaction"


def credential_label(credential: int | None, default_id: int | None) -> str:
    """`default` for the default credential (or none given), else `per_transaction`."""
    if credential is None or credential == default_id:
        return DEFAULT_CREDENTIAL
    return PER_TRANSACTION


BAKONG_CALLS = Counter(
    "khqr_bakong_calls_total",
    "Bakong API calls by endpoint and outcome (ok, or the error kind)",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)
BAKONG_LATENCY = Histogram(
    "khqr_bakong_call_seconds",
    "Bakong API call latency",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
BAKONG_GEO_BLOCKED = Gauge(
    "khqr_bakong_refusing_everything",
    "1 while Bakong has answered 403 to every call for a minute or more (hosts outside "
    "Cambodia are refused: set BAKONG_PROXY_URL)",
    registry=REGISTRY,
)
MD5_CHECKS = Counter(
    "khqr_md5_checks_total",
    "md5 checks by what Bakong said (paid, failed, not_found, error)",
    ["result"],
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "khqr_transitions_total",
    "Terminal transitions recorded, by status",
    ["status"],
    registry=REGISTRY,
)
LATE_PAYMENTS = Counter(
    "khqr_late_payments_total",
    "Payments found after a timeout or a cancel, by new status and the status before",
    ["status", "previous"],
    registry=REGISTRY,
)
RETENTION_ROWS = Counter(
    "khqr_retention_rows_total",
    "Rows retention removed: transactions, deliveries and attempts deleted, response bodies"
    " blanked",
    ["kind"],
    registry=REGISTRY,
)
DELIVERY_ATTEMPTS = Counter(
    "khqr_webhook_attempts_total",
    "Webhook attempts by outcome (delivered, retry, failed)",
    ["outcome"],
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "khqr_webhook_attempt_seconds",
    "Webhook attempt duration",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "khqr_queue_depth",
    "Members of each Redis schedule (poll, deliver, deliver_retry)",
    ["queue"],
    registry=REGISTRY,
)
POLL_LAG = Gauge(
    "khqr_poll_lag_seconds",
    "Now minus the oldest due time in the poll schedule (0 when nothing is overdue)",
    registry=REGISTRY,
)
PENDING = Gauge(
    "khqr_pending_transactions",
    "Transactions waiting for a payment, from Postgres",
    registry=REGISTRY,
)
TOKEN_EXPIRY = Gauge(
    "khqr_bakong_token_expiry_seconds",
    "Seconds until the default credential's token expires (0 or less: unusable); "
    "per_transaction: the soonest of the other active credentials",
    ["credential"],
    registry=REGISTRY,
)
CREDENTIALS = Gauge(
    "khqr_bakong_credentials",
    "Stored Bakong credentials: the default and all others (per_transaction), by status",
    ["credential", "status"],
    registry=REGISTRY,
)
TICK_ERRORS = Counter(
    "khqr_tick_errors_total",
    "Periodic ticks that raised, by tick",
    ["tick"],
    registry=REGISTRY,
)
BAKONG_THROTTLED = Counter(
    "khqr_bakong_throttled_total",
    "Bakong calls put off because the shared rate limit (BAKONG_MAX_RPS) had no room",
    registry=REGISTRY,
)
BAKONG_CIRCUIT = Gauge(
    "khqr_bakong_circuit_open",
    "Circuit breakers open (calls stopped): the default credential's (0 or 1), and how "
    "many of the others' (per_transaction)",
    ["credential"],
    registry=REGISTRY,
)
BAKONG_ONE_BY_ONE = Gauge(
    "khqr_bakong_list_refused",
    "Credentials whose list endpoint Bakong refuses, their md5s checked one call each (the "
    "default's: 0 or 1; per_transaction: how many of the others), as this process sees it",
    ["credential"],
    registry=REGISTRY,
)
TOKEN_RENEWALS = Counter(
    "khqr_bakong_token_renewals_total",
    "Bakong token renewals by outcome (ok, or the error kind)",
    ["outcome"],
    registry=REGISTRY,
)
