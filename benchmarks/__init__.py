"""Runnable benchmarks (``python -m benchmarks.NAME`` from the repository root) and their results."""
