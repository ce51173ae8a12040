"""Request and response schemas (marshmallow): validation here, documentation in OpenAPI."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import orjson
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

from khqr_gateway.models import Status

MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
METADATA_MAX_BYTES = 4096
URL_MAX = 2048
CURRENCIES = ("KHR", "USD")


def check_md5(value: str) -> str:
    if not MD5_RE.match(value):
        raise ValidationError("must be 32 hexadecimal characters")
    return value.lower()


def check_webhook_url(value: str) -> str:
    if len(value) > URL_MAX:
        raise ValidationError(f"must be at most {URL_MAX} characters")
    if any(c.isspace() for c in value):
        raise ValidationError("must not contain whitespace")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValidationError("must be an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("must be an absolute http(s) URL")
    return value


class AmountField(fields.Field):
    """A positive decimal amount given as a JSON number or a numeric string."""

    default_error_messages = {"invalid": "must be a positive number"}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise self.make_error("invalid")
        try:
            amount = Decimal(str(value).strip())
        except InvalidOperation:
            raise self.make_error("invalid") from None
        if not amount.is_finite() or amount <= 0 or amount > Decimal("1e13"):
            raise self.make_error("invalid")
        return amount

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else str(value)


class ExpectedSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = AmountField(metadata={"description": "Amount the payment must carry"})
    currency = fields.String(
        validate=validate.OneOf(CURRENCIES), metadata={"description": "KHR or USD"}
    )
    toAccountId = fields.String(
        validate=validate.Length(min=3, max=64),
        metadata={"description": "Bakong account the payment must reach, e.g. name@bank"},
    )

    @validates_schema
    def _not_empty(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError("give at least one of amount, currency, toAccountId")


class TransactionCreateSchema(Schema):
    """POST /api/v1/transactions."""

    class Meta:
        unknown = RAISE

    md5 = fields.String(metadata={"description": "md5 of the KHQR string (32 hex)"})
    qr = fields.String(
        validate=validate.Length(min=20, max=1024),
        metadata={"description": "The whole KHQR string; md5 and expectations come from it"},
    )
    webhookUrl = fields.String(required=True, metadata={"description": "Where the webhook goes"})
    token = fields.String(
        validate=validate.Length(min=10, max=4096),
        metadata={"description": "Bakong token for this transaction (else the default)"},
    )
    email = fields.String(
        validate=[validate.Length(max=254), validate.Regexp(EMAIL_RE, error="must be an email")],
        metadata={"description": "Registered Bakong email; tokens are renewed through it"},
    )
    expected = fields.Nested(ExpectedSchema, metadata={"description": "Payment must match"})
    timeoutSeconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=10, max=3600),
        metadata={"description": "Tracking window in seconds (default POLL_TIMEOUT_S)"},
    )
    metadata = fields.Dict(metadata={"description": "Echoed in the webhook; at most 4 KB"})

    @validates("md5")
    def _md5(self, value: str, **kwargs: Any) -> None:
        check_md5(value)

    @validates("webhookUrl")
    def _url(self, value: str, **kwargs: Any) -> None:
        check_webhook_url(value)

    @validates("metadata")
    def _metadata(self, value: dict[str, Any], **kwargs: Any) -> None:
        if len(orjson.dumps(value)) > METADATA_MAX_BYTES:
            raise ValidationError(f"must be at most {METADATA_MAX_BYTES} bytes as JSON")

    @validates_schema
    def _one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "md5" not in data and "qr" not in data:
            raise ValidationError("give md5 or qr", field_name="md5")
        if "token" in data and "email" in data:
            raise ValidationError("give token or email, not both", field_name="token")

    @post_load
    def _normalise(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if "md5" in data:
            data["md5"] = data["md5"].lower()
        return data


class TransactionListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    md5 = fields.String()
    status = fields.String(validate=validate.OneOf([s.value for s in Status]))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(max=200))

    @validates("md5")
    def _md5(self, value: str, **kwargs: Any) -> None:
        check_md5(value)


class DeliverySummarySchema(Schema):
    id = fields.String()
    status = fields.String()
    attempts = fields.Integer()
    lastStatusCode = fields.Integer(allow_none=True)
    nextAttemptAt = fields.DateTime(allow_none=True)
    deliveredAt = fields.DateTime(allow_none=True)


class TransactionCreatedSchema(Schema):
    jobId = fields.UUID(required=True)
    md5 = fields.String(required=True)
    status = fields.String(required=True)
    createdAt = fields.DateTime(required=True)
    deadlineAt = fields.DateTime(required=True)


class TransactionSchema(TransactionCreatedSchema):
    reason = fields.String(allow_none=True)
    webhookUrl = fields.String()
    expected = fields.Dict(allow_none=True)
    metadata = fields.Raw(allow_none=True)
    data = fields.Dict(allow_none=True, metadata={"description": "Bakong transaction data"})
    updatedAt = fields.DateTime()
    completedAt = fields.DateTime(allow_none=True)
    delivery = fields.Nested(DeliverySummarySchema, allow_none=True)


class TransactionPageSchema(Schema):
    data = fields.List(fields.Nested(TransactionSchema))
    nextCursor = fields.String(allow_none=True)
    hasMore = fields.Boolean()


class ErrorDetailSchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Raw(allow_none=True)


class ErrorSchema(Schema):
    error = fields.Nested(ErrorDetailSchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"description": "ok or unavailable"})
    checks = fields.Dict(keys=fields.String(), values=fields.String())
    tickErrors = fields.Dict(keys=fields.String(), values=fields.String())


class StatsSchema(Schema):
    transactions = fields.Dict(keys=fields.String(), values=fields.Integer())
    deliveries = fields.Dict(keys=fields.String(), values=fields.Integer())
    queues = fields.Dict(keys=fields.String(), values=fields.Integer())
    pollLagSeconds = fields.Float()
    oldestPendingSeconds = fields.Float(allow_none=True)
    bakong = fields.Dict()
    inFlightDeliveries = fields.Integer()
