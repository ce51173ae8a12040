"""The fields and validators the API's schemas share: ids, URLs, tokens, amounts, metadata."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)

from khqr_gateway.deliveries.ssrf import client_url

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


METADATA_DESCRIPTION = (
    "Echoed in the webhook; at most 4 KB, 32 levels deep, integers within 64 bits"
)


def metadata_field() -> fields.Dict:
    """A request's `metadata`, checked by the hook checks_metadata() gives."""
    return fields.Dict(metadata={"description": METADATA_DESCRIPTION})


def checks_metadata() -> Callable[..., None]:
    """A schema's hook that holds its `metadata` to check_metadata.

    A hook, not a validator of the field: it runs once every field is loaded, so that its
    error follows theirs in `details`, where it has always been.
    """

    def check(self: Schema, value: dict[str, Any], **kwargs: Any) -> None:
        check_metadata(value)

    hook: Callable[..., None] = validates("metadata")(check)
    return hook


def checks_window(*, since: str = "since", until: str = "until") -> Callable[..., None]:
    """A schema's hook: `until` must be later than `since` when both are given; the error
    names them as the request does (`since` and `until` may be data keys, `from` and `to`)."""

    def check(self: Schema, data: dict[str, Any], **kwargs: Any) -> None:
        if "since" in data and "until" in data and data["since"] >= data["until"]:
            raise ValidationError(f"must be later than {since}", field_name=until)

    hook: Callable[..., None] = validates_schema(check)
    return hook


class Md5PathSchema(Schema):
    md5 = md5_field("md5 of the KHQR string", required=True)


class JobIdPathSchema(Schema):
    jobId = fields.UUID(required=True, metadata={"description": "The transaction's jobId"})


class CredentialCreateSchema(Schema):
    """A Bakong credential: POST /api/v1/credentials, and an app's `bakong`."""

    class Meta:
        unknown = RAISE

    token = token_field("A Bakong token (JWT); stored, never shown again")
    email = email_field("Registered Bakong email; tokens are renewed through it")

    @validates_schema
    def _something(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("token") and not data.get("email"):
            raise ValidationError("give token, email or both", field_name="token")
