"""How good a model is: MMLU (our evaluator and lm-eval's), held-out perplexity, and fidelity (KL
divergence against a reference). Imports neither the harness nor deploy or distribution."""
