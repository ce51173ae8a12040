"""Storage adapters: Postgres queries and Redis schedules."""
