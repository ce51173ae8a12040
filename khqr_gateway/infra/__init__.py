"""Adapters that know no concept: Postgres pool, Redis schedules, locks, rate limits, ticks."""
