"""The shared harness: one entry point, one training loop, one evaluator, one record format."""
