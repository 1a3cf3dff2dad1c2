"""Benchmarks of issue #7: ``python -m bench [--quick]`` (see docs/benchmarks.md)."""
