"""Benchmark command lines, on top of every other package.

bench_train: training throughput and memory; bench_eval: evaluation speed.
"""
