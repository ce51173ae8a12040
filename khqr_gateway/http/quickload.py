"""The usual body of POST /api/v1/transactions, and the usual query of its list, loaded
without marshmallow: their fast paths."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import ValidationError

from khqr_gateway.http.fields import (
    ACCOUNT_ID_MAX,
    ACCOUNT_ID_MIN,
    CURRENCIES,
    MD5_RE,
    TIMEOUT_MAX_S,
    TIMEOUT_MIN_S,
    check_metadata,
    check_webhook_url,
    parse_amount,
)
from khqr_gateway.transactions.model import Status

_CREATE_FAST_KEYS = frozenset({"md5", "webhookUrl", "metadata", "timeoutSeconds", "expected"})
_EXPECTED_KEYS = frozenset({"amount", "currency", "toAccountId"})
_LIST_FAST_KEYS = frozenset({"status", "limit"})
_STATUSES = frozenset(s.value for s in Status)
# At most this many digits: the list's limit is 1 to 100.
_LIMIT_DIGITS = 3


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
    for name, quick in _OPTIONAL:
        if name in data:
            value = quick(data[name])
            if value is None:
                return None
            loaded[name] = value
    return loaded


def _quick_timeout(value: Any) -> int | None:
    if type(value) is not int or not TIMEOUT_MIN_S <= value <= TIMEOUT_MAX_S:
        return None
    return value


def _quick_metadata(value: Any) -> dict[str, Any] | None:
    if type(value) is not dict:
        return None
    try:
        check_metadata(value)
    except ValidationError:
        return None
    return dict(value)


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


_OPTIONAL: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("timeoutSeconds", _quick_timeout),
    ("metadata", _quick_metadata),
    ("expected", _quick_expected),
)


def quick_load_list_query(
    query: Mapping[str, str], *, default_limit: int, max_limit: int
) -> dict[str, Any] | None:
    """What TransactionListQuerySchema().load(query) gives for the usual query (a status, a
    limit, or neither); None for anything else, which marshmallow then loads or refuses. A
    test holds it to the schema, as for the create body."""
    if not query.keys() <= _LIST_FAST_KEYS:
        return None
    loaded: dict[str, Any] = {"limit": default_limit}
    if "status" in query:
        if query["status"] not in _STATUSES:
            return None
        loaded["status"] = query["status"]
    if "limit" in query:
        text = query["limit"]
        if not (0 < len(text) <= _LIMIT_DIGITS and text.isascii() and text.isdigit()):
            return None
        limit = int(text)
        if not 1 <= limit <= max_limit:
            return None
        loaded["limit"] = limit
    return loaded
