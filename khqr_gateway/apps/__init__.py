"""Apps (tenants): each backend with its own keys, webhook secrets and settings."""
