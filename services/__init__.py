"""kumex-l3 services: each one is `python -m services.NAME`."""
