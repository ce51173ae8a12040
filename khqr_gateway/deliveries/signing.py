"""Standard Webhooks signatures: parse secrets, sign outgoing requests, verify incoming ones."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
SIGNATURE_VERSION = "v1"


class SecretError(ValueError):
    """A webhook secret is malformed; the message never contains the secret itself."""


class WebhookVerificationError(Exception):
    """A received webhook failed verification; the message says why."""


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """Parse WEBHOOK_SECRET: comma-separated ``whsec_<base64>`` secrets, newest first."""
    if not value.strip():
        return ()
    items = value.split(",")
    return tuple(_decode_item(item.strip(), index, len(items)) for index, item in enumerate(items))


def _decode_item(item: str, index: int, count: int) -> bytes:
    try:
        return decode_secret(item)
    except SecretError as exc:
        # Only the position is named: echoing the item would leak the secret into logs.
        raise SecretError(f"secret {index + 1} of {count}: {exc}") from None


def decode_secret(item: str) -> bytes:
    """Decode one ``whsec_<base64>`` secret to its key bytes."""
    if not item:
        raise SecretError("is empty")
    if not item.startswith(SECRET_PREFIX):
        raise SecretError(f"must start with {SECRET_PREFIX!r}")
    encoded = item.removeprefix(SECRET_PREFIX)
    try:
        # Secrets are often pasted without their '=' padding (Svix prints them so).
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"is not valid base64 after {SECRET_PREFIX!r}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise SecretError(
            f"decodes to {len(key)} bytes, expected {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}"
        )
    return key


def sign_headers(
    secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Headers for one delivery attempt; signature headers only when secrets are configured."""
    # Receivers dedupe by webhook-id even when nothing is signed, so id and time always go out.
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if not secrets:
        return headers
    signed = f"{msg_id}.{timestamp}.".encode() + body
    headers["webhook-signature"] = " ".join(_standard_signature(key, signed) for key in secrets)
    headers["x-webhook-signature"] = ", ".join(_simple_signature(key, body) for key in secrets)
    return headers


def _standard_signature(key: bytes, signed: bytes) -> str:
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _simple_signature(key: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: int = 300,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook's Standard Webhooks signature and return its JSON body.

    Raises WebhookVerificationError when a header is missing or malformed, the timestamp is
    more than ``tolerance_s`` away from ``now`` (either way), or no v1 signature matches.
    A malformed ``secret`` string raises SecretError instead: that is a setup mistake.
    """
    key = secret if isinstance(secret, bytes) else decode_secret(secret.strip())
    raw = body.encode() if isinstance(body, str) else body
    msg_id, timestamp, signatures = _required_headers(headers)
    _check_timestamp(timestamp, time.time() if now is None else now, tolerance_s)
    expected = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + raw, hashlib.sha256).digest()
    if not any(hmac.compare_digest(expected, sig) for sig in _v1_signatures(signatures)):
        raise WebhookVerificationError("no matching signature")
    return _json_object(raw)


def _required_headers(headers: Mapping[str, str]) -> tuple[str, int, str]:
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [
        name
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        if not lowered.get(name)
    ]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    stamp = lowered["webhook-timestamp"].strip()
    if not (stamp.isascii() and stamp.isdigit()):
        raise WebhookVerificationError("webhook-timestamp is not integer unix seconds")
    return lowered["webhook-id"], int(stamp), lowered["webhook-signature"]


def _check_timestamp(timestamp: int, now: float, tolerance_s: int) -> None:
    if timestamp < now - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > now + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")


def _v1_signatures(header: str) -> list[bytes]:
    # Unknown versions and undecodable entries are skipped, not fatal: the spec lets a
    # sender list several signatures and the receiver needs only one to match.
    found = []
    for entry in header.split():
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return parsed
