"""What one run is made of: its config, model, training data and loop, measurement and record.

experiments/run.py strings these together; evaluation, deploy and distribution never import them.
"""
