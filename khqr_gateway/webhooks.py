"""Webhook signing, sending and retry policy."""

from __future__ import annotations

from khqr_gateway.deliveries.signing import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
