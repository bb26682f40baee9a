"""sandbox service."""
