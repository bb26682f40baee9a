"""book service."""
