"""strategy service."""
