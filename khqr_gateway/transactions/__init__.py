"""Transactions: the payment state machine, its store, ingest, polling and live status."""
