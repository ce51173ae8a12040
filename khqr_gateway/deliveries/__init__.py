"""Webhook deliveries: their store, signing, SSRF guard, retry policy and sender."""
