"""The harness: one entry point, one training loop, one evaluator, one record format.

Sub-packages by concern, each importing only those below it (pyproject.toml's import-linter layers):

- ``run``: the entry point and the run's pipeline (``python -m experiments.run``);
- ``harness``: what one run is made of: config, model, data, training loop, measurement, record,
  summaries;
- ``evaluation`` (MMLU, perplexity, lm-eval backend, fidelity), ``deploy`` (exports, the GGUF
  writer), ``distribution`` (processes and ranks, sharded checkpoints): side by side, none
  imports another or the harness;
- ``assets``: the bundled model and MMLU files, which every layer above may read.

Imports core and methods; never analysis or benchmarks.
"""
