"""Benchmarks and long runs against real Strife processes (not part of the timed test suite)."""
