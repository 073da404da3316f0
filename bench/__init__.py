"""Benchmark harness of xybrid: ``python -m bench`` (see bench/README.md)."""
