"""Reading run records back: tables, plots, notebooks."""
