"""Benchmarks: `python -m benchmarks.<name> [--quick]`; each prints a table and writes JSON + PNG to benchmarks/results/."""
