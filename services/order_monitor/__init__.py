"""order_monitor service."""
