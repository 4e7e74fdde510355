"""A run's process topology (one process, DDP replicas or FSDP shards), launching the ranks, their process
group, and the sharded checkpoint.
Imports neither the harness nor evaluation or deploy."""
