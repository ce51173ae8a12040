"""Tracking a payment from a loaded request, as every create route does it.

POST /api/v1/transactions, the rachhen/khqr-webhook creates and POST /api/v1/khqr share it.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from khqr_gateway.apps.model import Caller
from khqr_gateway.bakong import khqr
from khqr_gateway.credentials.model import token_expired
from khqr_gateway.deliveries.ssrf import AddressPolicy
from khqr_gateway.http.errors import ApiError, invalid
from khqr_gateway.http.json import iso
from khqr_gateway.service import Service
from khqr_gateway.times import from_ms
from khqr_gateway.transactions.model import Expected
from khqr_gateway.transactions.store import CreatedRow, NewTransaction, TransactionRow

log = logging.getLogger(__name__)


def created_json(row: CreatedRow) -> dict[str, Any]:
    """The answer to a create."""
    return {
        "jobId": str(row.id),
        "md5": row.md5,
        "status": row.status,
        "createdAt": iso(row.created_at),
        "deadlineAt": iso(row.deadline_at),
    }


async def create(
    service: Service, caller: Caller, data: dict[str, Any], *, repeat_must_match: bool = True
) -> tuple[CreatedRow, bool]:
    """Track a validated request of the caller's app; returns the row and whether it is new.

    An md5 already tracked is that transaction, whatever its status: with
    `repeat_must_match`, a repeat that asks for another webhookUrl, expected or metadata is
    refused (409) rather than silently answered with what the first request asked for.
    """
    refused = AddressPolicy.for_settings(service.settings).check_url(data["webhookUrl"])
    if refused:
        raise invalid("webhookUrl", refused)
    qr_expires_at = _from_qr(data) if "qr" in data else None
    new = NewTransaction(
        app_id=caller.app_id,
        id=uuid.uuid4(),
        md5=data["md5"],
        webhook_url=data["webhookUrl"],
        credential_id=await credential_id(service, caller, data),
        expected=_expected(data.get("expected")),
        metadata=data.get("metadata"),
        qr=data.get("qr"),
        deadline_at=_deadline(service, data, qr_expires_at),
        qr_expires_at=qr_expires_at,
    )
    # Written together with the creates of other requests waiting at the same moment.
    row, created = await service.ingest.create(new)
    if created:
        log.debug("transaction created", extra={"jobId": str(row.id), "md5": row.md5})
    elif repeat_must_match:
        # A row that is not new was read whole.
        assert isinstance(row, TransactionRow)
        _check_repeat(row, new)
    return row, created


def _deadline(service: Service, data: dict[str, Any], qr_expires_at: datetime | None) -> datetime:
    timeout_s = data.get("timeoutSeconds", service.settings.poll_timeout_s)
    deadline_at = datetime.now(UTC) + timedelta(seconds=timeout_s)
    if qr_expires_at is not None:
        # The tracking window never outlives the QR: past its expiry it cannot be paid.
        deadline_at = min(deadline_at, qr_expires_at)
    return deadline_at


def _from_qr(data: dict[str, Any]) -> datetime | None:
    """Fill md5 and expectations from a KHQR string (explicit fields win); returns when the
    QR expires, when it says."""
    try:
        # Every rule payer apps apply: a QR they refuse can never be paid.
        parsed = khqr.verify(data["qr"])
    except khqr.KhqrError as exc:
        detail = {"field": "qr", "message": str(exc), "rule": exc.rule}
        raise ApiError(422, "validation_error", "some fields are not valid", [detail]) from None
    if not parsed.dynamic:
        raise invalid("qr", "a static KHQR cannot be tracked by md5; use a dynamic one")
    if "md5" in data and data["md5"] != parsed.md5:
        raise invalid("md5", "does not match the md5 of qr")
    data["md5"] = parsed.md5
    derived = {
        "amount": parsed.amount,
        "currency": parsed.currency,
        "toAccountId": parsed.account_id,
    }
    expected = {k: v for k, v in derived.items() if v is not None}
    expected.update(data.get("expected") or {})
    data["expected"] = expected
    if parsed.expires_at_ms is None:
        return None
    return from_ms(parsed.expires_at_ms)


async def credential_id(service: Service, caller: Caller, data: dict[str, Any]) -> int | None:
    """The Bakong credential a request names, else its app's (None: the gateway's default);
    stored once, then cached."""
    token, email = data.get("token"), data.get("email")
    app_id = caller.app_id
    if token:
        if token_expired(token):
            raise ApiError(401, "token_expired", "the Bakong token has expired")
        return await service.credentials.add(token=token, email=None, app_id=app_id)
    if email:
        return await service.credentials.add(token=None, email=email, app_id=app_id)
    if caller.app is not None and caller.app.credential_id is not None:
        return caller.app.credential_id
    if service.credentials.default_id is None:
        raise invalid(
            "token", "no Bakong credential: give token or email, or set BAKONG_TOKEN/BAKONG_EMAIL"
        )
    return None


def _expected(given: dict[str, Any] | None) -> Expected | None:
    """What the request expects of the payment; None when it expects nothing (as stored)."""
    expected = Expected(
        amount=(given or {}).get("amount"),
        currency=(given or {}).get("currency"),
        to_account_id=(given or {}).get("toAccountId"),
    )
    return None if expected == Expected() else expected


def _check_repeat(row: TransactionRow, new: NewTransaction) -> None:
    """A repeated md5 must ask for what its transaction already does."""
    differ = [
        name
        for name, same in (
            ("webhookUrl", row.webhook_url == new.webhook_url),
            ("expected", Expected.from_json(row.expected) == new.expected),
            ("metadata", row.metadata == new.metadata),
        )
        if not same
    ]
    if differ:
        raise ApiError(
            409,
            "md5_already_tracked",
            f"this md5 is already tracked, with another {', '.join(differ)}: one md5 is one "
            "payment; use a new KHQR for a new payment",
            {"jobId": str(row.id), "status": row.status, "differs": differ},
        )
