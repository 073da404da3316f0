"""Helpers for xybrid's tests and benchmarks (tiny random-weight GGUF models)."""
