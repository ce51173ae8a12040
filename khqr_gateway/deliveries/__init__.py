"""Webhook deliveries: values, store, lanes, retry policy, signing, SSRF guard, sender, tick."""
