"""Benchmarks: each script prints its figures with the method beside them (see docs/benchmarks.md)."""
