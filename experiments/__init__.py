"""The harness: one entry point, one training loop, one evaluator, one record format.

Imports core and methods; never analysis or benchmarks (pyproject.toml's import-linter layers).
"""
