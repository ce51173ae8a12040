"""Development helpers: Postgres and Redis started by the gateway itself."""
