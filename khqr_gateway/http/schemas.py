"""Request and response schemas (marshmallow): validation here, documentation in OpenAPI."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from marshmallow import (
    EXCLUDE,
    INCLUDE,
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates,
    validates_schema,
)

from khqr_gateway.config import APP_NAME_MAX
from khqr_gateway.deliveries.model import DeliveryStatus
from khqr_gateway.deliveries.ssrf import client_url
from khqr_gateway.transactions.model import Status

MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
# No whitespace and no control characters: an email ends up in a Postgres text column.
_EMAIL_CHAR = r"[^@\s\x00-\x1f\x7f]"
EMAIL_RE = re.compile(rf"^{_EMAIL_CHAR}+@{_EMAIL_CHAR}+\.{_EMAIL_CHAR}+$")
# A token travels in an Authorization header: visible ASCII only (a JWT is far narrower).
TOKEN_RE = re.compile(r"^[!-~]+$")
# What check_webhook_url accepts, as far as a pattern can say it (OpenAPI only).
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://\S+$"
URL_MIN = len("http://a")
# The cursors we hand out: url-safe base64 of a small JSON array, or a credential id.
CURSOR_RE = re.compile(r"^[A-Za-z0-9_-]+$")
ID_CURSOR_RE = re.compile(r"^[0-9]{1,18}$")
CURSOR_ERROR = "is not a cursor this API gave"
MD5_ERROR = "must be 32 hexadecimal characters"
METADATA_MAX_BYTES = 4096
# Levels of objects and arrays, the metadata object the first: far more than an echo needs,
# far less than orjson writes (254), with room for the webhook body around it.
METADATA_MAX_DEPTH = 32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT64_ERROR = f"must be an integer from {INT64_MIN} to {INT64_MAX} (a bigger one as a string)"
# An integer beyond 64 bits has at least 19 digits (2**63 has 19), and orjson reads one as a
# float (or as unsigned, up to 2**64 - 1), no longer to be told from a number written so.
LONG_DIGITS = re.compile(rb"[0-9]{19}")
URL_MAX = 2048
CURRENCIES = ("KHR", "USD")
# A tracking window: any length up to an hour (a short one is how tests see a timeout soon).
TIMEOUT_MIN_S = 1
TIMEOUT_MAX_S = 3600
ACCOUNT_ID_MIN, ACCOUNT_ID_MAX = 3, 64


class Pattern(validate.Regexp):
    """A regular expression the whole value must match; OpenAPI shows it as `pattern`.

    validate.Regexp lets a trailing newline through (`$` matches before it); this does not.
    """

    def __call__(self, value: Any) -> Any:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


def check_metadata(value: dict[str, Any]) -> None:
    """Raise ValidationError unless `value` is metadata stored and echoed as given: at most
    METADATA_MAX_DEPTH levels deep, integers within 64 bits, METADATA_MAX_BYTES as JSON."""
    try:
        dumped = orjson.dumps(value)
    except TypeError:  # nested past 254 levels, or an integer past 64 bits
        _check_nesting_and_integers(value)
        raise ValidationError("must hold only JSON values") from None
    # Too deep takes as many brackets, too wide an integer a run of 19 digits: only such
    # metadata pays for the walk (slower than all the rest of the quick loader).
    if dumped.count(b"[") + dumped.count(b"{") > METADATA_MAX_DEPTH or LONG_DIGITS.search(dumped):
        _check_nesting_and_integers(value)
    if len(dumped) > METADATA_MAX_BYTES:
        raise ValidationError(f"must be at most {METADATA_MAX_BYTES} bytes as JSON")


def _check_nesting_and_integers(value: dict[str, Any]) -> None:
    for path, depth, item in walk_json(value):
        if depth > METADATA_MAX_DEPTH and isinstance(item, dict | list):
            raise ValidationError(f"must nest at most {METADATA_MAX_DEPTH} levels")
        if type(item) is int and not INT64_MIN <= item <= INT64_MAX:
            # Named by its path, as marshmallow names a nested field: metadata.a.0.b.
            raise ValidationError({path: [INT64_ERROR]})


def walk_json(value: Any) -> Iterator[tuple[str, int, Any]]:
    """Each value in `value` (itself at depth 1) with its dotted path and depth, parents
    before children; a loop, as orjson reads nesting deeper than Python's recursion limit."""
    stack: list[tuple[str, int, Any]] = [("", 1, value)]
    while stack:
        path, depth, item = stack.pop()
        yield path, depth, item
        if isinstance(item, dict):
            children: Iterator[tuple[Any, Any]] = iter(item.items())
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        for key, child in children:
            stack.append((f"{path}.{key}" if path else str(key), depth + 1, child))


def check_md5(value: str) -> str:
    if not MD5_RE.fullmatch(value):
        raise ValidationError(MD5_ERROR)
    return value.lower()


def check_webhook_url(value: str) -> str:
    if len(value) > URL_MAX:
        raise ValidationError(f"must be at most {URL_MAX} characters")
    if any(c.isspace() for c in value):
        raise ValidationError("must not contain whitespace")
    if any(c < " " or c == "\x7f" for c in value):
        raise ValidationError("must not contain control characters")
    # Parsed as the webhook client will parse it, so that what passes here can be sent.
    url = client_url(value)
    if url is None or url.scheme not in ("http", "https") or not url.raw_host:
        raise ValidationError("must be an absolute http(s) URL")
    return value


_AMOUNT_MAX = Decimal("1e13")


def parse_amount(value: Any) -> Decimal | None:
    """A positive decimal amount from a JSON number or a numeric string, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount <= 0 or amount > _AMOUNT_MAX:
        return None
    return amount


class AmountField(fields.Field):
    """A positive decimal amount given as a JSON number or a numeric string."""

    default_error_messages = {"invalid": "must be a positive number"}  # noqa: RUF012

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Decimal:
        amount = parse_amount(value)
        if amount is None:
            raise self.make_error("invalid")
        return amount

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else str(value)


def md5_field(description: str, **kwargs: Any) -> fields.String:
    return fields.String(
        validate=Pattern(MD5_RE, error=MD5_ERROR), metadata={"description": description}, **kwargs
    )


def url_field(description: str, **kwargs: Any) -> fields.String:
    """An absolute http(s) URL, checked by check_webhook_url and documented beside it."""
    return fields.String(
        validate=check_webhook_url,
        metadata={
            "description": description,
            "pattern": URL_PATTERN,
            "minLength": URL_MIN,
            "maxLength": URL_MAX,
        },
        **kwargs,
    )


def token_field(description: str, **kwargs: Any) -> fields.String:
    return fields.String(
        validate=[
            validate.Length(min=10, max=4096),
            Pattern(TOKEN_RE, error="must be visible ASCII characters (a JWT)"),
        ],
        metadata={"description": description},
        **kwargs,
    )


def email_field(description: str, **kwargs: Any) -> fields.String:
    return fields.String(
        validate=[validate.Length(max=254), Pattern(EMAIL_RE, error="must be an email")],
        metadata={"description": description},
        **kwargs,
    )


def cursor_field() -> fields.String:
    return fields.String(
        validate=[validate.Length(max=200), Pattern(CURSOR_RE, error=CURSOR_ERROR)],
        metadata={"description": "nextCursor of the previous page"},
    )


class Instant(fields.AwareDateTime):
    """An ISO 8601 time (UTC when it names no offset), loaded in UTC.

    One that leaves years 1 to 9999 once in UTC (0001-01-01T00:00+05:00) is refused here,
    not by the database driver as a 500.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(default_timezone=UTC, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        loaded = super()._deserialize(value, attr, data, **kwargs)
        try:
            return loaded.astimezone(UTC)
        except OverflowError:
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None


class ExpectedSchema(Schema):
    class Meta:
        unknown = RAISE

    amount = AmountField(metadata={"description": "Amount the payment must carry"})
    currency = fields.String(
        validate=validate.OneOf(CURRENCIES), metadata={"description": "KHR or USD"}
    )
    toAccountId = fields.String(
        validate=validate.Length(min=ACCOUNT_ID_MIN, max=ACCOUNT_ID_MAX),
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

    md5 = md5_field("md5 of the KHQR string (32 hex)")
    qr = fields.String(
        validate=validate.Length(min=20, max=1024),
        metadata={"description": "The whole KHQR string; md5 and expectations come from it"},
    )
    webhookUrl = url_field("Where the webhook goes", required=True)
    token = token_field("Bakong token for this transaction (else the default)")
    email = email_field("Registered Bakong email; tokens are renewed through it")
    expected = fields.Nested(ExpectedSchema, metadata={"description": "Payment must match"})
    timeoutSeconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=TIMEOUT_MIN_S, max=TIMEOUT_MAX_S),
        metadata={"description": "Tracking window in seconds (default POLL_TIMEOUT_S)"},
    )
    metadata = fields.Dict(
        metadata={
            "description": "Echoed in the webhook; at most 4 KB, 32 levels deep, integers "
            "within 64 bits"
        }
    )

    @validates("metadata")
    def _metadata(self, value: dict[str, Any], **kwargs: Any) -> None:
        check_metadata(value)

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


_CREATE_FAST_KEYS = frozenset({"md5", "webhookUrl", "metadata", "timeoutSeconds", "expected"})
_EXPECTED_KEYS = frozenset({"amount", "currency", "toAccountId"})


def quick_load_create(data: dict[str, Any]) -> dict[str, Any] | None:
    """What TransactionCreateSchema().load(data) gives, for the usual valid body (md5,
    webhookUrl, and maybe metadata, timeoutSeconds, expected) at a fraction of the cost;
    None for anything else, which marshmallow then loads, or refuses with its field errors.

    Marshmallow stays the one source of truth: a test checks that whatever this accepts,
    the schema loads to the same value.
    """
    if not data.keys() <= _CREATE_FAST_KEYS:
        return None
    md5, url = data.get("md5"), data.get("webhookUrl")
    if type(md5) is not str or type(url) is not str or MD5_RE.fullmatch(md5) is None:
        return None
    try:
        check_webhook_url(url)
    except ValidationError:
        return None
    loaded: dict[str, Any] = {"md5": md5.lower(), "webhookUrl": url}
    if "timeoutSeconds" in data:
        timeout = data["timeoutSeconds"]
        if type(timeout) is not int or not TIMEOUT_MIN_S <= timeout <= TIMEOUT_MAX_S:
            return None
        loaded["timeoutSeconds"] = timeout
    if "metadata" in data:
        metadata = data["metadata"]
        if type(metadata) is not dict:
            return None
        try:
            check_metadata(metadata)
        except ValidationError:
            return None
        loaded["metadata"] = dict(metadata)
    if "expected" in data:
        expected = _quick_expected(data["expected"])
        if expected is None:
            return None
        loaded["expected"] = expected
    return loaded


def _quick_expected(value: Any) -> dict[str, Any] | None:
    if type(value) is not dict or not value or not value.keys() <= _EXPECTED_KEYS:
        return None
    expected: dict[str, Any] = {}
    if "amount" in value:
        amount = parse_amount(value["amount"])
        if amount is None:
            return None
        expected["amount"] = amount
    if "currency" in value:
        if type(value["currency"]) is not str or value["currency"] not in CURRENCIES:
            return None
        expected["currency"] = value["currency"]
    if "toAccountId" in value:
        account = value["toAccountId"]
        if type(account) is not str or not ACCOUNT_ID_MIN <= len(account) <= ACCOUNT_ID_MAX:
            return None
        expected["toAccountId"] = account
    return expected


SEARCH_MAX = 200


class TransactionListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    md5 = md5_field("Only transactions of this md5")
    status = fields.String(validate=validate.OneOf([s.value for s in Status]))
    q = fields.String(
        validate=validate.Length(min=1, max=SEARCH_MAX),
        metadata={
            "description": "A jobId, an md5 prefix (4 hex digits or more), a bill number, or "
            "a value anywhere in the metadata (the whole value, any case)"
        },
    )
    since = Instant(metadata={"description": "Created at or after this ISO 8601 time"})
    until = Instant(metadata={"description": "Created before this ISO 8601 time"})
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = cursor_field()

    @validates_schema
    def _window(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "since" in data and "until" in data and data["since"] >= data["until"]:
            raise ValidationError("must be later than since", field_name="until")


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
    late = fields.Boolean(
        metadata={"description": "Paid after the gateway had given up on it (a late payment)"}
    )
    previousStatus = fields.String(
        allow_none=True,
        metadata={"description": "For a late payment: `timeout` or `cancelled`, before it"},
    )
    deeplink = fields.String(
        allow_none=True, metadata={"description": "POST /api/v1/khqr's deep link, if any"}
    )
    lateWatchUntil = fields.DateTime(
        allow_none=True,
        metadata={
            "description": "After a timeout or a cancel, the md5 is still checked for a late "
            "payment until then (the QR's expiry plus LATE_MARGIN_S, else LATE_WATCH_S)"
        },
    )
    delivery = fields.Nested(
        DeliverySummarySchema,
        allow_none=True,
        metadata={"description": "Its latest webhook delivery (a late payment's, once made)"},
    )


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

    md5 = md5_field("md5 of the KHQR string", required=True)
    webhookUrl = url_field("Where the webhook goes", required=True)

    @post_load
    def _normalise(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data["md5"] = data["md5"].lower()
        return data


class CompatTokenCreateSchema(CompatCreateSchema):
    """POST /api/v1/transaction/token."""

    token = token_field("Bakong token; refused with 401 when its JWT has expired", required=True)


class CompatEmailCreateSchema(CompatCreateSchema):
    """POST /api/v1/transaction/email."""

    email = email_field("Registered Bakong email; tokens are renewed through it", required=True)


class CompatMd5QuerySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    token = token_field("Bakong token")
    email = email_field("Registered Bakong email")


class Md5PathSchema(Schema):
    md5 = md5_field("md5 of the KHQR string", required=True)


class JobIdPathSchema(Schema):
    jobId = fields.UUID(required=True, metadata={"description": "The transaction's jobId"})


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
    """Bakong's transaction `data`, passed on as Bakong sent it (with whatever else it sent)."""

    class Meta:
        unknown = INCLUDE

    hash = fields.String(allow_none=True)
    fromAccountId = fields.String(allow_none=True)
    toAccountId = fields.String(allow_none=True)
    currency = fields.String(allow_none=True)
    amount = fields.Float(allow_none=True)
    description = fields.String(allow_none=True)
    createdDateMs = fields.Integer(allow_none=True)
    acknowledgedDateMs = fields.Integer(allow_none=True)


# KHQR generation ------------------------------------------------------------------------

# Where the Bakong app returns after a payment: an https URL or an app's own scheme
# (`myshop://orders/7`); never one a browser would run or read as a document.
CALLBACK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[!-~]+$")
REFUSED_SCHEMES = frozenset({"javascript", "data", "vbscript", "file", "blob"})


def check_callback(value: str) -> str:
    if value.split(":", 1)[0].lower() in REFUSED_SCHEMES:
        raise ValidationError("must be an https URL or an app link, not a script or a document")
    return value


class DeeplinkSourceSchema(Schema):
    """What the Bakong app shows of the app that sent the payer (generate_deeplink_by_qr)."""

    class Meta:
        unknown = RAISE

    appName = fields.String(
        validate=validate.Length(min=1, max=APP_NAME_MAX),
        metadata={"description": "Default KHQR_APP_NAME, else merchantName"},
    )
    appIconUrl = url_field("Default KHQR_APP_ICON_URL, else Bakong's logo")
    callbackUrl = fields.String(
        validate=[
            validate.Length(min=3, max=URL_MAX),
            Pattern(CALLBACK_RE, error="must be an https URL or an app link (myapp://...)"),
            check_callback,
        ],
        metadata={
            "description": "Where the Bakong app returns once paid: an https URL or an app "
            "link; default the payment page (with webhookUrl), else Bakong's site"
        },
    )


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
    merchantCategoryCode = fields.String(validate=Pattern(r"^[0-9]{4}$"))
    billNumber = fields.String(validate=validate.Length(min=1, max=25))
    mobileNumber = fields.String(validate=validate.Length(min=1, max=25))
    storeLabel = fields.String(validate=validate.Length(min=1, max=25))
    terminalLabel = fields.String(validate=validate.Length(min=1, max=25))
    purpose = fields.String(validate=validate.Length(min=1, max=25))
    expiresInSeconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=TIMEOUT_MIN_S, max=TIMEOUT_MAX_S),
        metadata={"description": "QR validity and tracking window (default POLL_TIMEOUT_S)"},
    )
    image = fields.String(
        validate=validate.OneOf(["svg", "png"]),
        metadata={"description": "Also return the QR image as a data URL"},
    )
    webhookUrl = url_field("Given: tracking starts at once")
    returnUrl = url_field("The payment page goes here once paid")
    deeplink = fields.Nested(
        DeeplinkSourceSchema,
        metadata={
            "description": "How the Bakong app presents the deep link of the answer (each "
            "field has a default)"
        },
    )
    token = token_field("Bakong token for the tracking (else the default)")
    email = email_field("Registered Bakong email for the tracking")
    metadata = fields.Dict(
        metadata={
            "description": "Echoed in the webhook; at most 4 KB, 32 levels deep, integers "
            "within 64 bits"
        }
    )

    @validates("metadata")
    def _metadata(self, value: dict[str, Any], **kwargs: Any) -> None:
        check_metadata(value)

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
    deeplink = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "description": "Bakong's link that opens its app with this payment filled in, for a "
            "customer on the phone that shows the QR; null when Bakong gave none (the QR "
            "still works). Opaque: use it as given"
        },
    )


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


DELIVERY_STATUSES = [s.value for s in DeliveryStatus]
BULK_RETRY_MAX = 1000


class DeliveryListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(DELIVERY_STATUSES))
    jobId = fields.UUID(metadata={"description": "Only the deliveries of this transaction"})
    transactionId = fields.UUID(metadata={"description": "The same as jobId"})
    since = Instant(
        metadata={"description": "Only deliveries created at or after this ISO 8601 time"}
    )
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = cursor_field()

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
    since = Instant(metadata={"description": "Created at or after this ISO 8601 time"})
    until = Instant(metadata={"description": "Created before this ISO 8601 time"})
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

    token = token_field("A Bakong token (JWT); stored, never shown again")
    email = email_field("Registered Bakong email; tokens are renewed through it")

    @validates_schema
    def _something(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("token") and not data.get("email"):
            raise ValidationError("give token, email or both", field_name="token")


class CredentialListQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(CREDENTIAL_STATUSES))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=500))
    cursor = fields.String(
        validate=Pattern(ID_CURSOR_RE, error=CURSOR_ERROR),
        metadata={"description": "nextCursor of the previous page"},
    )


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
