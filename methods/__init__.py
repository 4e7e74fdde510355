"""Method plugins: one module per quantization + PEFT method; methods/base.py is the contract.

Imports core only, never the harness (experiments), analysis or benchmarks.
"""
