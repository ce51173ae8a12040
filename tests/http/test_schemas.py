"""Property tests: every request validator, given any JSON at all, either accepts it or
answers a 422 listing fields; never another exception (which would be a 500)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError

from khqr_gateway.http import apps, compat, credentials, deliveries, fields, khqr, transactions
from khqr_gateway.http.errors import ApiError
from khqr_gateway.http.quickload import quick_load_create, quick_load_list_query
from khqr_gateway.http.request import load
from khqr_gateway.http.tracking import _from_qr

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "md5",
        "qr",
        "webhookUrl",
        "token",
        "email",
        "expected",
        "timeoutSeconds",
        "metadata",
        "amount",
        "currency",
        "toAccountId",
        "status",
        "limit",
        "cursor",
        "since",
        "until",
        "jobId",
        "accountId",
        "merchantName",
        "image",
        "returnUrl",
        "expiresInSeconds",
        "name",
        "merchant",
        "bakong",
        "telegram",
        "rateLimit",
        "expiresInDays",
    ]
)
# Bodies that look like real requests: known field names with values of any type.
BODIES = st.dictionaries(FIELDS, JSON, max_size=8) | JSON

REQUEST_SCHEMAS: list[type[Schema]] = [
    transactions.TransactionCreateSchema,
    transactions.TransactionListQuerySchema,
    compat.CompatTokenCreateSchema,
    compat.CompatEmailCreateSchema,
    khqr.KhqrCreateSchema,
    deliveries.DeliveryListQuerySchema,
    deliveries.DeliveryRetryFilterSchema,
    fields.CredentialCreateSchema,
    credentials.CredentialListQuerySchema,
    apps.AppCreateSchema,
    apps.AppUpdateSchema,
    apps.AppListQuerySchema,
    apps.KeyCreateSchema,
    apps.MerchantSchema,
    apps.TelegramSchema,
]


@pytest.mark.parametrize("schema", REQUEST_SCHEMAS, ids=lambda s: s.__name__)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_validators_accept_or_answer_422(schema: type[Schema], body: Any) -> None:
    try:
        load(schema(), body)
    except ApiError as exc:
        assert exc.status == 422
        assert exc.code == "validation_error"


@settings(max_examples=300, deadline=None)
@given(qr=st.text(max_size=300))
def test_any_qr_string_is_accepted_or_a_422_on_qr(qr: str) -> None:
    try:
        _from_qr({"qr": qr})
    except ApiError as exc:
        assert exc.status == 422
        assert exc.details[0]["field"] in ("qr", "md5")


# The quick loader of the create body (the hot path of ingest) must agree with the schema.

HEX = "0123456789abcdefABCDEF"
CREATE_VALUES = {
    "md5": st.text(HEX, min_size=31, max_size=33) | JSON,
    "webhookUrl": st.sampled_from(
        [
            "https://shop.example/hook",
            "http://127.0.0.1:8080/paid?order=1",
            "HTTPS://Shop.Example/x",
            "ftp://shop.example/hook",
            "https://",
            "http://shop .example/",
            "https://shop.example:99999/",
            "https://shop.example/" + "x" * 2100,
            "http://\uff11\uff12\uff17.0.0.1/",
            "http://127.0.0.1\\@shop.example/",
            "http://[]@",
        ]
    )
    | JSON,
    "timeoutSeconds": st.integers(0, 5000) | JSON,
    "metadata": st.dictionaries(st.text(max_size=8), JSON, max_size=4) | JSON,
    "expected": st.fixed_dictionaries(
        {},
        optional={
            "amount": st.integers(-5, 10**14) | st.floats() | st.sampled_from(["1.5", " 2 ", "x"]),
            "currency": st.sampled_from(["USD", "KHR", "usd"]) | JSON,
            "toAccountId": st.text(max_size=70) | JSON,
            "other": JSON,
        },
    )
    | JSON,
    "qr": JSON,
    "token": JSON,
    "email": JSON,
    "unknown": JSON,
}
URLS = ["https://shop.example/hook", "http://127.0.0.1:8080/paid?order=1"]


@st.composite
def create_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A usual body (often valid), with up to two fields then replaced by anything."""
    body: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {"md5": st.text(HEX, min_size=32, max_size=32), "webhookUrl": st.sampled_from(URLS)},
            optional={
                "timeoutSeconds": st.integers(0, 5000) | st.sampled_from([0, 1, 3600, 3601]),
                "metadata": st.dictionaries(st.text(max_size=8), JSON, max_size=4),
                "expected": CREATE_VALUES["expected"],
            },
        )
    )
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(sorted(CREATE_VALUES)))
        body[field] = draw(CREATE_VALUES[field])
    return body


def _loaded_by_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = transactions.TransactionCreateSchema().load(body)
    except ValidationError:
        return None
    return loaded


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=create_bodies())
def test_quick_create_loader_accepts_only_what_the_schema_loads_the_same(
    body: dict[str, Any],
) -> None:
    quick = quick_load_create(body)
    if quick is not None:
        assert _same(quick, _loaded_by_schema(body))


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included (metadata may hold one; it is stored as JSON null either way)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


@pytest.mark.parametrize(
    "body",
    [
        {"md5": "A" * 32, "webhookUrl": "https://shop.example/hook"},
        {
            "md5": "0123456789abcdef" * 2,
            "webhookUrl": "https://shop.example/hook",
            "metadata": {"orderId": "1001", "items": [1, 2.5, None, {"k": True}]},
            "timeoutSeconds": 600,
            "expected": {"amount": "12.50", "currency": "USD", "toAccountId": "shop@abaa"},
        },
        {"md5": "f" * 32, "webhookUrl": "http://127.0.0.1:9/x", "expected": {"amount": 4000}},
    ],
)
def test_usual_create_bodies_take_the_quick_path(body: dict[str, Any]) -> None:
    quick = quick_load_create(body)
    assert quick is not None
    assert _same(quick, _loaded_by_schema(body))


LIST_VALUES = st.one_of(
    st.sampled_from(["success", "pending", "mismatch", "Success", "50", "100", "101", "0", "1"]),
    st.sampled_from(["050", "-1", "+5", " 5", "5 ", "1_0", "٣", "20.0", "", "1e2"]),
    st.text(max_size=6),
)
LIST_QUERIES = st.dictionaries(
    st.sampled_from(["status", "limit", "md5", "cursor", "q", "other"]), LIST_VALUES, max_size=3
)


def _list_loaded_by_schema(query: dict[str, str]) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = transactions.LIST_QUERY_SCHEMA.load(query)
    except ValidationError:
        return None
    return loaded


@settings(max_examples=1500, deadline=None)
@given(query=LIST_QUERIES)
def test_quick_list_query_loader_accepts_only_what_the_schema_loads_the_same(
    query: dict[str, str],
) -> None:
    quick = quick_load_list_query(
        query,
        default_limit=transactions.LIST_LIMIT_DEFAULT,
        max_limit=transactions.LIST_LIMIT_MAX,
    )
    if quick is not None:
        assert _same(quick, _list_loaded_by_schema(query))


@pytest.mark.parametrize(
    "query", [{}, {"status": "success"}, {"limit": "50"}, {"status": "failed", "limit": "100"}]
)
def test_usual_list_queries_take_the_quick_path(query: dict[str, str]) -> None:
    quick = quick_load_list_query(
        query,
        default_limit=transactions.LIST_LIMIT_DEFAULT,
        max_limit=transactions.LIST_LIMIT_MAX,
    )
    assert quick is not None
    assert _same(quick, _list_loaded_by_schema(query))


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "metadata",
    [
        {"n": 2**63},
        {"n": 2**64},
        {"n": -(2**63) - 1},
        {"a": [{"b": 10**30}]},
        {"deep": _nested(32)},  # 33 levels with the metadata object
    ],
)
def test_both_create_loaders_refuse_metadata_the_api_cannot_echo(metadata: Any) -> None:
    body = {"md5": "a" * 32, "webhookUrl": URLS[0], "metadata": metadata}
    assert quick_load_create(body) is None
    assert _loaded_by_schema(body) is None


def test_both_create_loaders_keep_64_bit_integers_and_31_nested_arrays() -> None:
    metadata = {"max": 2**63 - 1, "min": -(2**63), "deep": _nested(31)}
    body = {"md5": "a" * 32, "webhookUrl": URLS[0], "metadata": metadata}
    quick = quick_load_create(body)
    assert quick is not None and quick["metadata"] == metadata
    assert _same(quick, _loaded_by_schema(body))


@pytest.mark.parametrize("schema", REQUEST_SCHEMAS, ids=lambda s: s.__name__)
def test_nesting_past_the_recursion_limit_is_a_422(schema: type[Schema]) -> None:
    body = {"metadata": {"deep": _nested(5000)}, "status": _nested(5000)}
    with pytest.raises(ApiError) as caught:
        load(schema(), body)
    assert caught.value.status == 422
