"""Schemathesis hooks of test_schemathesis.py: the gateway's webhooks stay on this host.

A webhookUrl that the gateway would accept is swapped for its own sandbox inbox
(KHQR_WEBHOOK_SINK), so a transaction that ends during the run posts its webhook to
loopback, never to a host the fuzzer made up. URLs the gateway refuses are left alone:
they are what tests the validation.

In the stateful phase, every transaction it creates takes the inbox and (unless it gives a
QR) an md5 of its own: that phase is about the links from a created transaction to the
next requests, and a create refused for its made-up URL or missing md5 (most of them, the
first phases having tested those refusals) would end its scenario before any link.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import schemathesis
from marshmallow import ValidationError

from khqr_gateway.http.fields import check_webhook_url

SINK = os.environ["KHQR_WEBHOOK_SINK"]
CREATE = ("POST", "/api/v1/transactions")


def _accepted(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        check_webhook_url(value)
    except ValidationError:
        return False
    return True


def _stateful_create(case: Any) -> bool:
    return (
        case.meta is not None
        and case.meta.phase.name == "stateful"
        and (case.method.upper(), case.operation.path) == CREATE
    )


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    body = case.body
    if not isinstance(body, dict):
        return case
    if _stateful_create(case):
        body["webhookUrl"] = SINK
        if not body.get("qr"):
            body["md5"] = secrets.token_hex(16)
    elif _accepted(body.get("webhookUrl")):
        body["webhookUrl"] = SINK
    return case
