"""Tests for webhook signing against the Standard Webhooks reference verifier."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks import WebhookVerificationError as ReferenceVerificationError

from khqr_gateway.deliveries.signing import SecretError, parse_secrets, sign_headers
from khqr_gateway.webhooks import WebhookVerificationError, verify

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 124))
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
BODY = b'{"status":"success","data":{"hash":"abc"},"md5":"0123","jobId":"j1"}'


def signed(
    secrets: list[bytes], body: bytes = BODY, timestamp: int | None = None
) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return sign_headers(secrets, "msg_1", stamp, body)


# parse_secrets


def test_parse_secrets_empty_means_unsigned() -> None:
    assert parse_secrets("") == ()
    assert parse_secrets("   ") == ()


def test_parse_secrets_list_with_whitespace() -> None:
    assert parse_secrets(f" {SECRET_A} , {SECRET_B}") == (KEY_A, KEY_B)


def test_parse_secrets_accepts_unpadded_base64() -> None:
    unpadded = SECRET_A.rstrip("=")
    assert unpadded != SECRET_A
    assert parse_secrets(unpadded) == (KEY_A,)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (base64.b64encode(KEY_A).decode(), "must start with 'whsec_'"),
        ("whsec_not*base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"x" * 16).decode(), "16 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
        ("whsec_", "0 bytes"),
        (f"{SECRET_A},", "secret 2 of 2: is empty"),
    ],
)
def test_parse_secrets_rejects_bad_items(value: str, reason: str) -> None:
    with pytest.raises(SecretError, match=reason):
        parse_secrets(value)


def test_secret_error_does_not_echo_the_secret() -> None:
    leaked = "whsec_" + base64.b64encode(b"topsecret-but-too-short").decode()
    with pytest.raises(SecretError) as info:
        parse_secrets(f"{SECRET_A},{leaked}")
    message = str(info.value)
    assert "secret 2 of 2" in message
    assert leaked.removeprefix("whsec_") not in message
    assert SECRET_A.removeprefix("whsec_") not in message


def test_secret_error_is_a_value_error() -> None:
    assert issubclass(SecretError, ValueError)


# sign_headers


def test_no_secret_sends_id_and_timestamp_only() -> None:
    assert sign_headers((), "msg_1", 1700000000, BODY) == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
    }


def test_signature_verified_by_reference() -> None:
    headers = signed([KEY_A])
    assert headers["webhook-id"] == "msg_1"
    assert Webhook(SECRET_A).verify(BODY, headers) == json.loads(BODY)


def test_simple_signature_is_hmac_of_raw_body() -> None:
    expected = hmac.new(KEY_A, BODY, hashlib.sha256).hexdigest()
    assert signed([KEY_A])["x-webhook-signature"] == f"sha256={expected}"


def test_rotation_either_secret_verifies() -> None:
    headers = signed([KEY_A, KEY_B])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)
        assert verify(secret, headers, BODY) == json.loads(BODY)


def test_rotation_simple_signature_lists_each_secret_in_order() -> None:
    entries = signed([KEY_A, KEY_B])["x-webhook-signature"].split(", ")
    assert entries == [
        "sha256=" + hmac.new(key, BODY, hashlib.sha256).hexdigest() for key in (KEY_A, KEY_B)
    ]


def test_reference_rejects_other_secret() -> None:
    other = "whsec_" + base64.b64encode(b"z" * 32).decode()
    with pytest.raises(ReferenceVerificationError):
        Webhook(other).verify(BODY, signed([KEY_A]))


def test_signed_bytes_are_the_bytes_given_non_ascii() -> None:
    body = json.dumps({"name": "ហាងកាហ្វេ", "note": "café"}, ensure_ascii=False).encode()
    headers = sign_headers([KEY_A], "msg_é", 1700000000, body)
    message = "msg_é.1700000000.".encode() + body
    digest = base64.b64encode(hmac.new(KEY_A, message, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{digest}"
    fresh = signed([KEY_A], body=body)
    assert Webhook(SECRET_A).verify(body, fresh)["name"] == "ហាងកាហ្វេ"
    # Re-encoding the same JSON differently (escaped) must not verify: bytes, not meaning.
    escaped = json.dumps(json.loads(body)).encode()
    with pytest.raises(ReferenceVerificationError):
        Webhook(SECRET_A).verify(escaped, fresh)


# verify


def test_verify_round_trip_with_bytes_and_str() -> None:
    headers = signed([KEY_A])
    assert verify(SECRET_A, headers, BODY) == json.loads(BODY)
    assert verify(KEY_A, headers, BODY.decode()) == json.loads(BODY)


def test_verify_headers_case_insensitive() -> None:
    headers = {name.upper(): value for name, value in signed([KEY_A]).items()}
    assert verify(SECRET_A, headers, BODY)["jobId"] == "j1"


def test_verify_rejects_tampered_body() -> None:
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SECRET_A, signed([KEY_A]), BODY.replace(b"success", b"failed!"))


def test_verify_rejects_wrong_secret() -> None:
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(KEY_B, signed([KEY_A]), BODY)


def test_verify_rejects_old_and_future_timestamps() -> None:
    now = 1700000000.0
    headers = signed([KEY_A], timestamp=int(now) - 301)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET_A, headers, BODY, now=now)
    headers = signed([KEY_A], timestamp=int(now) + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(SECRET_A, headers, BODY, now=now)


def test_verify_accepts_edges_of_tolerance() -> None:
    now = 1700000000.0
    for stamp in (int(now) - 300, int(now) + 300):
        assert verify(SECRET_A, signed([KEY_A], timestamp=stamp), BODY, now=now)
    assert verify(
        SECRET_A, signed([KEY_A], timestamp=int(now) - 900), BODY, now=now, tolerance_s=900
    )


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_missing_header(header: str) -> None:
    headers = signed([KEY_A])
    del headers[header]
    with pytest.raises(WebhookVerificationError, match=f"missing header.*{header}"):
        verify(SECRET_A, headers, BODY)


def test_verify_rejects_unsigned_delivery() -> None:
    with pytest.raises(WebhookVerificationError, match="webhook-signature"):
        verify(SECRET_A, sign_headers((), "msg_1", int(time.time()), BODY), BODY)


def test_verify_rejects_non_integer_timestamp() -> None:
    headers = signed([KEY_A])
    headers["webhook-timestamp"] = "soon"
    with pytest.raises(WebhookVerificationError, match="integer"):
        verify(SECRET_A, headers, BODY)


def test_verify_skips_unknown_versions_and_garbage() -> None:
    headers = signed([KEY_A])
    headers["webhook-signature"] = "v2,abc v1,!!! nonsense " + headers["webhook-signature"]
    assert verify(SECRET_A, headers, BODY)["md5"] == "0123"


def test_verify_rejects_non_object_body() -> None:
    body = b"[1, 2]"
    with pytest.raises(WebhookVerificationError, match="JSON object"):
        verify(SECRET_A, signed([KEY_A], body=body), body)


def test_verify_bad_secret_is_a_secret_error() -> None:
    with pytest.raises(SecretError):
        verify("nope", signed([KEY_A]), BODY)
