"""Request and response schemas (marshmallow): validation here, documentation in OpenAPI."""

from __future__ import annotations

import re
from datetime import UTC
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import orjson
from marshmallow import (
    EXCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

from khqr_gateway.models import DeliveryStatus, Status

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


# Compatibility with rachhen/khqr-webhook ----------------------------------------------


class CompatCreateSchema(Schema):
    """The body of that service's create routes; unknown fields are dropped, as there."""

    class Meta:
        unknown = EXCLUDE

    md5 = fields.String(required=True, metadata={"description": "md5 of the KHQR string"})
    webhookUrl = fields.String(required=True, metadata={"description": "Where the webhook goes"})

    @validates("md5")
    def _md5(self, value: str, **kwargs: Any) -> None:
        check_md5(value)

    @validates("webhookUrl")
    def _url(self, value: str, **kwargs: Any) -> None:
        check_webhook_url(value)

    @post_load
    def _normalise(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["md5"] = data["md5"].lower()
        return data


class CompatTokenCreateSchema(CompatCreateSchema):
    """POST /api/v1/transaction/token."""

    token = fields.String(
        required=True,
        validate=validate.Length(min=10, max=4096),
        metadata={"description": "Bakong token; refused with 401 when its JWT has expired"},
    )


class CompatEmailCreateSchema(CompatCreateSchema):
    """POST /api/v1/transaction/email."""

    email = fields.String(
        required=True,
        validate=[validate.Length(max=254), validate.Regexp(EMAIL_RE, error="must be an email")],
        metadata={"description": "Registered Bakong email; tokens are renewed through it"},
    )


class CompatMd5QuerySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    token = fields.String(metadata={"description": "Bakong token"})
    email = fields.String(metadata={"description": "Registered Bakong email"})


class CompatCreatedSchema(Schema):
    message = fields.String(required=True, metadata={"example": "Transaction created"})
    jobId = fields.String(required=True)


class CompatErrorSchema(Schema):
    """That service's error body, with ours beside it under `error`."""

    name = fields.String(required=True, metadata={"example": "NOT_FOUND"})
    code = fields.Raw(metadata={"description": "Bakong errorCode, when Bakong gave one"})
    message = fields.String(required=True)
    details = fields.Raw(allow_none=True)
    error = fields.Nested(ErrorDetailSchema, required=True)


class BakongTransactionSchema(Schema):
    """Bakong's transaction `data`, passed on as Bakong sent it."""

    hash = fields.String()
    fromAccountId = fields.String()
    toAccountId = fields.String()
    currency = fields.String()
    amount = fields.Float()
    description = fields.String()
    createdDateMs = fields.Integer()
    acknowledgedDateMs = fields.Integer()


# KHQR generation ------------------------------------------------------------------------


class KhqrCreateSchema(Schema):
    """POST /api/v1/khqr."""

    class Meta:
        unknown = RAISE

    amount = AmountField(required=True, metadata={"description": "KHR whole; USD 2 decimals"})
    currency = fields.String(required=True, validate=validate.OneOf(CURRENCIES))
    accountId = fields.String(
        validate=validate.Length(min=3, max=32),
        metadata={"description": "Bakong account paid, name@bank (default KHQR_ACCOUNT_ID)"},
    )
    merchantName = fields.String(
        validate=validate.Length(min=1, max=25),
        metadata={"description": "Shown to the payer (default KHQR_MERCHANT_NAME)"},
    )
    merchantCity = fields.String(
        validate=validate.Length(min=1, max=15),
        metadata={"description": "Default KHQR_MERCHANT_CITY, else Phnom Penh"},
    )
    merchantType = fields.String(
        load_default="individual", validate=validate.OneOf(["individual", "merchant"])
    )
    accountInformation = fields.String(validate=validate.Length(min=1, max=32))
    acquiringBank = fields.String(validate=validate.Length(min=1, max=32))
    merchantCategoryCode = fields.String(validate=validate.Regexp(r"^[0-9]{4}$"))
    billNumber = fields.String(validate=validate.Length(min=1, max=25))
    mobileNumber = fields.String(validate=validate.Length(min=1, max=25))
    storeLabel = fields.String(validate=validate.Length(min=1, max=25))
    terminalLabel = fields.String(validate=validate.Length(min=1, max=25))
    purpose = fields.String(validate=validate.Length(min=1, max=25))
    expiresInSeconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=10, max=3600),
        metadata={"description": "QR validity and tracking window (default POLL_TIMEOUT_S)"},
    )
    image = fields.String(
        validate=validate.OneOf(["svg", "png"]),
        metadata={"description": "Also return the QR image as a data URL"},
    )
    webhookUrl = fields.String(metadata={"description": "Given: tracking starts at once"})
    returnUrl = fields.String(metadata={"description": "The payment page goes here once paid"})
    token = fields.String(
        validate=validate.Length(min=10, max=4096),
        metadata={"description": "Bakong token for the tracking (else the default)"},
    )
    email = fields.String(
        validate=[validate.Length(max=254), validate.Regexp(EMAIL_RE, error="must be an email")],
        metadata={"description": "Registered Bakong email for the tracking"},
    )
    metadata = fields.Dict(metadata={"description": "Echoed in the webhook; at most 4 KB"})

    @validates("webhookUrl")
    def _url(self, value: str, **kwargs: Any) -> None:
        check_webhook_url(value)

    @validates("returnUrl")
    def _return_url(self, value: str, **kwargs: Any) -> None:
        check_webhook_url(value)

    @validates("metadata")
    def _metadata(self, value: dict[str, Any], **kwargs: Any) -> None:
        if len(orjson.dumps(value)) > METADATA_MAX_BYTES:
            raise ValidationError(f"must be at most {METADATA_MAX_BYTES} bytes as JSON")

    @validates_schema
    def _tracking_fields(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "webhookUrl" in data:
            if "token" in data and "email" in data:
                raise ValidationError("give token or email, not both", field_name="token")
            return
        for name in ("returnUrl", "token", "email", "metadata"):
            if name in data:
                raise ValidationError("applies only with webhookUrl", field_name=name)


class KhqrCreatedSchema(Schema):
    qr = fields.String(required=True, metadata={"description": "The KHQR string to show"})
    md5 = fields.String(required=True)
    expiresAt = fields.DateTime(required=True)
    image = fields.String(metadata={"description": "data:image/svg+xml or image/png, base64"})
    jobId = fields.UUID(metadata={"description": "With webhookUrl: the tracked transaction"})
    status = fields.String()
    createdAt = fields.DateTime()
    deadlineAt = fields.DateTime()
    payUrl = fields.String(metadata={"description": "With webhookUrl: the hosted payment page"})


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
            "breakers by credential id) and `problem` when the default credential is expired"
        }
    )


class StatsSchema(Schema):
    transactions = fields.Dict(keys=fields.String(), values=fields.Integer())
    deliveries = fields.Dict(keys=fields.String(), values=fields.Integer())
    queues = fields.Dict(keys=fields.String(), values=fields.Integer())
    pollLagSeconds = fields.Float()
    oldestPendingSeconds = fields.Float(allow_none=True)
    bakong = fields.Dict()
    inFlightDeliveries = fields.Integer()


DELIVERY_STATUSES = [s.value for s in DeliveryStatus]
BULK_RETRY_MAX = 1000


class DeliveryListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    jobId = fields.UUID(metadata={"description": "Only the delivery of this transaction"})
    transactionId = fields.UUID(metadata={"description": "The same as jobId"})
    since = fields.AwareDateTime(
        default_timezone=UTC,
        metadata={"description": "Only deliveries created at or after this ISO 8601 time"},
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(max=200))

    @validates_schema
    def _one_job(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "jobId" in data and "transactionId" in data and data["jobId"] != data["transactionId"]:
            raise ValidationError("jobId and transactionId differ", field_name="transactionId")


class DeliveryRetryFilterSchema(Schema):
    """POST /api/v1/deliveries/retry."""

    class Meta:
        unknown = RAISE

    status = fields.String(
        load_default=DeliveryStatus.FAILED.value,
        validate=validate.OneOf(DELIVERY_STATUSES),
        metadata={"description": "Deliveries in this status (default failed)"},
    )
    since = fields.AwareDateTime(
        default_timezone=UTC,
        metadata={"description": "Created at or after this ISO 8601 time"},
    )
    until = fields.AwareDateTime(
        default_timezone=UTC, metadata={"description": "Created before this ISO 8601 time"}
    )
    limit = fields.Integer(
        strict=True,
        load_default=BULK_RETRY_MAX,
        validate=validate.Range(min=1, max=BULK_RETRY_MAX),
        metadata={"description": f"At most this many, oldest first (max {BULK_RETRY_MAX})"},
    )

    @validates_schema
    def _window(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "since" in data and "until" in data and data["since"] >= data["until"]:
            raise ValidationError("must be later than since", field_name="until")


class DeliveryAttemptSchema(Schema):
    attempt = fields.Integer(required=True)
    startedAt = fields.DateTime(required=True)
    durationMs = fields.Integer(required=True)
    statusCode = fields.Integer(allow_none=True)
    errorKind = fields.String(
        allow_none=True,
        metadata={"description": "timeout, connect, dns, tls, ssrf-blocked, ... (no answer)"},
    )
    errorMessage = fields.String(allow_none=True)
    responseBody = fields.String(allow_none=True, metadata={"description": "First 4 KB"})
    responseHeaders = fields.Dict(keys=fields.String(), values=fields.String(), allow_none=True)


class DeliverySchema(Schema):
    id = fields.String(required=True, metadata={"description": "Also the webhook-id header"})
    jobId = fields.UUID(required=True)
    md5 = fields.String(required=True)
    url = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(DELIVERY_STATUSES))
    attemptCount = fields.Integer(required=True)
    nextAttemptAt = fields.DateTime(allow_none=True)
    lastAttemptAt = fields.DateTime(allow_none=True)
    lastStatusCode = fields.Integer(allow_none=True)
    lastError = fields.String(allow_none=True)
    createdAt = fields.DateTime(required=True)
    updatedAt = fields.DateTime(required=True)
    deliveredAt = fields.DateTime(allow_none=True)


class DeliveryDetailSchema(DeliverySchema):
    payload = fields.Raw(metadata={"description": "The webhook body, as sent"})
    attempts = fields.List(fields.Nested(DeliveryAttemptSchema))


class DeliveryPageSchema(Schema):
    data = fields.List(fields.Nested(DeliverySchema))
    nextCursor = fields.String(allow_none=True)
    hasMore = fields.Boolean()


class DeliveryRetryResultSchema(Schema):
    retried = fields.Integer(required=True)
    ids = fields.List(fields.String())
    hasMore = fields.Boolean(metadata={"description": "More deliveries match the filter"})


CREDENTIAL_STATUSES = ("active", "expired")


class CredentialCreateSchema(Schema):
    """POST /api/v1/credentials."""

    class Meta:
        unknown = RAISE

    token = fields.String(
        validate=validate.Length(min=10, max=4096),
        metadata={"description": "A Bakong token (JWT); stored, never shown again"},
    )
    email = fields.String(
        validate=[validate.Length(max=254), validate.Regexp(EMAIL_RE, error="must be an email")],
        metadata={"description": "Registered Bakong email; tokens are renewed through it"},
    )

    @validates_schema
    def _something(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("token") and not data.get("email"):
            raise ValidationError("give token, email or both", field_name="token")


class CredentialListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(CREDENTIAL_STATUSES))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=500))
    cursor = fields.String(validate=validate.Length(max=32))


class CredentialSchema(Schema):
    """A credential as the API shows it: never its token."""

    id = fields.Integer(required=True, metadata={"description": "Also the metrics label"})
    email = fields.String(allow_none=True)
    hasToken = fields.Boolean(required=True)
    expiresAt = fields.DateTime(allow_none=True, metadata={"description": "The token's JWT exp"})
    status = fields.String(
        required=True,
        validate=validate.OneOf(CREDENTIAL_STATUSES),
        metadata={"description": "expired: no usable token and renewal failed (see lastError)"},
    )
    isDefault = fields.Boolean(required=True)
    lastError = fields.String(allow_none=True)
    createdAt = fields.DateTime(required=True)
    updatedAt = fields.DateTime(required=True)


class CredentialPageSchema(Schema):
    data = fields.List(fields.Nested(CredentialSchema))
    nextCursor = fields.String(allow_none=True)
    hasMore = fields.Boolean()
