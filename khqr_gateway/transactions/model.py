"""Typed values shared across the service: statuses, transactions, deliveries, check results."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any
from uuid import UUID

import orjson

from khqr_gateway.bakong.model import CheckKind, CheckResult


class Status(StrEnum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    MISMATCH = "mismatch"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not Status.PENDING

    @property
    def notifies(self) -> bool:
        """Every terminal state but `cancelled` gets exactly one webhook."""
        return self.terminal and self is not Status.CANCELLED


class Reason(StrEnum):
    """Why a transaction ended as it did, as `reason` says in Postgres, the API and webhooks
    (a mismatch's reason is instead the fields that differ)."""

    # At the final check Bakong still knew no payment by the md5.
    NOT_PAID = "not_paid"
    # Past the deadline and the grace Bakong gave no answer: it refused the token...
    BAKONG_UNAUTHORIZED = "bakong_unauthorized"
    # ... or could not be reached (network, 5xx, 429, open circuit).
    BAKONG_UNREACHABLE = "bakong_unreachable"
    TRANSACTION_FAILED = "transaction_failed"
    CANCELLED_BY_REQUEST = "cancelled_by_request"


@dataclass(frozen=True, slots=True)
class Expected:
    """What the merchant expects a paid transaction to carry; any field may be absent."""

    amount: Decimal | None = None
    currency: str | None = None
    to_account_id: str | None = None

    def to_json(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.amount is not None:
            out["amount"] = str(self.amount)
        if self.currency is not None:
            out["currency"] = self.currency
        if self.to_account_id is not None:
            out["toAccountId"] = self.to_account_id
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> Expected | None:
        if not value:
            return None
        amount = value.get("amount")
        return cls(
            amount=Decimal(str(amount)) if amount is not None else None,
            currency=value.get("currency"),
            to_account_id=value.get("toAccountId"),
        )


@dataclass(frozen=True, slots=True)
class PollItem:
    """A pending transaction as the poll tick needs it."""

    id: UUID
    md5: str
    deadline_at: datetime
    credential_id: int | None
    expected: Expected | None
    # When the transaction was created: young md5s are checked first when calls are short.
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A terminal state to record for one transaction, with its webhook body if it has one."""

    id: UUID
    status: Status
    reason: str | None
    data: dict[str, Any] | None
    delivery_id: str | None
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class LateWindow:
    """How long, and how often, an md5 given up on is still checked for a late payment."""

    # Past a known QR expiry (tag 99): the QR cannot be paid after it.
    margin_s: int
    # Past the deadline or the cancel, when the QR's expiry is not known.
    watch_s: int
    check_interval_s: float


@dataclass(frozen=True, slots=True)
class LateItem:
    """A timed-out or cancelled transaction still watched, as the late tick needs it."""

    poll: PollItem
    status: Status
    watch_until: datetime


@dataclass(frozen=True, slots=True)
class LateTransition:
    """A late payment to record: the transition, and the state it moves the transaction from."""

    transition: Transition
    previous: Status


@dataclass(frozen=True, slots=True)
class CancelledRow:
    """A transaction cancelled now, and until when it is watched for a late payment."""

    id: UUID
    late_watch_until: datetime


@dataclass(frozen=True, slots=True)
class DayTotals:
    """One row of the daily report: of one day (Asia/Phnom_Penh), currency and account paid,
    the final transactions by status, and the sums paid (exact)."""

    day: date
    currency: str | None
    account: str | None
    paid_count: int
    paid_sum: Decimal
    late_count: int
    mismatch_count: int
    mismatch_sum: Decimal
    failed_count: int
    timeout_count: int


@dataclass(frozen=True, slots=True)
class HourCounts:
    """One hour of the dashboard's charts: payments and mismatches completed in it, and the
    webhooks made in it by their outcome so far."""

    hour: datetime
    paid: int
    mismatch: int
    delivered: int
    failed: int
    retrying: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one check means for a pending transaction: a terminal state, or stay pending."""

    status: Status
    reason: Reason | str | None = None
    data: dict[str, Any] | None = None


PENDING = Outcome(Status.PENDING)


def mismatches(expected: Expected | None, data: dict[str, Any]) -> list[str]:
    """Each field where a paid transaction differs from what the merchant expected."""
    if expected is None:
        return []
    found: list[str] = []
    if expected.amount is not None:
        try:
            paid = Decimal(str(data.get("amount")))
        except InvalidOperation:
            paid = None
        if paid is None or paid != expected.amount:
            found.append(f"amount: expected {expected.amount}, got {data.get('amount')}")
    if expected.currency is not None:
        paid_currency = str(data.get("currency") or "")
        if paid_currency.upper() != expected.currency.upper():
            found.append(f"currency: expected {expected.currency}, got {paid_currency or None}")
    if expected.to_account_id is not None:
        paid_to = str(data.get("toAccountId") or "")
        if paid_to.lower() != expected.to_account_id.lower():
            found.append(f"toAccountId: expected {expected.to_account_id}, got {paid_to or None}")
    return found


def decide(item: PollItem, result: CheckResult, now: datetime, *, grace_s: float) -> Outcome:
    """The state machine of DESIGN.md for one check of one pending transaction.

    A check made at or after the deadline is the final check: only a not-found there
    times the transaction out. No answer is never evidence: past the deadline it is
    tried for `grace_s` more, then times out saying why.
    """
    if result.kind is CheckKind.PAID:
        data = result.data or {}
        differs = mismatches(item.expected, data)
        if differs:
            return Outcome(Status.MISMATCH, "; ".join(differs), data)
        return Outcome(Status.SUCCESS, None, data)
    if result.kind is CheckKind.FAILED:
        return Outcome(Status.FAILED, Reason.TRANSACTION_FAILED)
    if now < item.deadline_at:
        return PENDING
    if result.kind is CheckKind.NOT_FOUND:
        return Outcome(Status.TIMEOUT, Reason.NOT_PAID)
    if now >= item.deadline_at + timedelta(seconds=grace_s):
        return Outcome(Status.TIMEOUT, _no_answer(result))
    return PENDING


def _no_answer(result: CheckResult) -> Reason:
    if result.error is not None and result.error.unauthorized:
        return Reason.BAKONG_UNAUTHORIZED
    return Reason.BAKONG_UNREACHABLE


def new_delivery_id() -> str:
    """A webhook id in the style of Svix: `msg_` and 26 random url-safe characters."""
    return "msg_" + secrets.token_urlsafe(20)[:26]


def webhook_body(
    *,
    job_id: UUID,
    md5: str,
    outcome: Outcome,
    metadata: Any = None,
    late_from: Status | None = None,
) -> bytes:
    """The webhook body of rachhen/khqr-webhook, plus `reason` and `metadata` when present;
    a late payment says so and what the transaction was before (`late_from`)."""
    body: dict[str, Any] = {"status": outcome.status.value}
    if late_from is not None:
        body["late"] = True
        body["previousStatus"] = late_from.value
    body |= {
        "data": outcome.data,
        "md5": md5,
        "jobId": str(job_id),
    }
    if outcome.reason is not None:
        body["reason"] = outcome.reason
    if metadata is not None:
        body["metadata"] = metadata
    return orjson.dumps(body)


def transition(
    item: PollItem, outcome: Outcome, metadata: Any = None, late_from: Status | None = None
) -> Transition:
    delivery_id = new_delivery_id() if outcome.status.notifies else None
    payload = (
        webhook_body(
            job_id=item.id, md5=item.md5, outcome=outcome, metadata=metadata, late_from=late_from
        )
        if delivery_id
        else None
    )
    return Transition(item.id, outcome.status, outcome.reason, outcome.data, delivery_id, payload)
