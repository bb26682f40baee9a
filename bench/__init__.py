"""Benchmarks of kumex-l3 and their baselines (run with ``make bench``)."""
