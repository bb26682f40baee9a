"""feed service."""
