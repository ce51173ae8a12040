"""Schemathesis hooks of test_schemathesis.py: the gateway's webhooks stay on this host.

A webhookUrl that the gateway would accept is swapped for its own sandbox inbox
(KHQR_WEBHOOK_SINK), so a transaction that ends during the run posts its webhook to
loopback, never to a host the fuzzer made up. URLs the gateway refuses are left alone:
they are what tests the validation.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from marshmallow import ValidationError

from khqr_gateway.http.fields import check_webhook_url

SINK = os.environ["KHQR_WEBHOOK_SINK"]


def _accepted(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        check_webhook_url(value)
    except ValidationError:
        return False
    return True


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    body = case.body
    if isinstance(body, dict) and _accepted(body.get("webhookUrl")):
        body["webhookUrl"] = SINK
    return case
