"""The bottom layer: what every other package needs, and nothing of theirs.

User errors, exact tensor bytes, the cache folder and its build-once entries, atomic file
writes, the CPU's facts and the compute dtype they imply, model shapes and presets.
Imports only the standard library, torch and transformers; never methods, experiments,
analysis or benchmarks (pyproject.toml's import-linter contract enforces it).
"""
