"""Notices to people: Telegram messages to the merchant and alerts to the operator."""
