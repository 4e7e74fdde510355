"""Method plugins: one module per quantization + PEFT method (see methods/base.py)."""
