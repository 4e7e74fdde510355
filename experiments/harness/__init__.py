"""What one run is made of: its config, model, training data and loop, measurement and record.

plan.py checks a run's config and pipeline.py strings these together (experiments/run.py only says in
which processes); evaluation, deploy and distribution never import them.
"""
