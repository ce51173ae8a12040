"""Typed values shared across the service: statuses, transactions, deliveries, check results."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any
from uuid import UUID


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

    @property
    def watched_late(self) -> bool:
        """A QR given up on can still be paid: these states are watched for a late payment."""
        return self in (Status.TIMEOUT, Status.CANCELLED)


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class CheckKind(StrEnum):
    """What one Bakong check said about one md5."""

    PAID = "paid"
    FAILED = "failed"
    NOT_FOUND = "not_found"
    # No trustworthy answer: network, 5xx, 429, 401/403, malformed reply, static QR.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class CheckResult:
    kind: CheckKind
    data: dict[str, Any] | None = None
    # Why there was no answer (ERROR) or why Bakong refused (FAILED); short snake_case words.
    error: str | None = None
    # No answer yet and not worth asking again for this many seconds (429, open circuit).
    retry_after: float | None = None


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
