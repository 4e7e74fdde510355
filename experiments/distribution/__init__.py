"""One run as several processes: launching the ranks, their process group, and the sharded checkpoint.
Imports neither the harness nor evaluation or deploy."""
