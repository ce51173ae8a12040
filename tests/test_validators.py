"""Property tests: every request validator, given any JSON at all, either accepts it or
answers a 422 listing fields; never another exception (which would be a 500)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema

from khqr_gateway.api import schemas
from khqr_gateway.api.errors import ApiError
from khqr_gateway.api.transactions import _from_qr, load

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
    ]
)
# Bodies that look like real requests: known field names with values of any type.
BODIES = st.dictionaries(FIELDS, JSON, max_size=8) | JSON

REQUEST_SCHEMAS: list[type[Schema]] = [
    schemas.TransactionCreateSchema,
    schemas.TransactionListQuerySchema,
    schemas.CompatTokenCreateSchema,
    schemas.CompatEmailCreateSchema,
    schemas.KhqrCreateSchema,
    schemas.DeliveryListQuerySchema,
    schemas.DeliveryRetryFilterSchema,
    schemas.CredentialCreateSchema,
    schemas.CredentialListQuerySchema,
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
