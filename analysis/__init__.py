"""Reading run records back: tables, plots, notebooks; and the memory model.

Imports core, methods and experiments (record layout, model resolution); never benchmarks.
"""
