"""The CPU heap benchmark (benchmarks/bench_heap.py): whole CLI runs under cpu_heap=exact and fast, A B B A;
the heap policy moves no figure a run measures, only its time and its CPU peak."""

import json

import pytest

from benchmarks import bench_heap


@pytest.mark.slow
def test_both_heap_policies_measure_the_same_figures_and_the_report_gives_their_ratios(tmp_path):
    report = bench_heap.main(
        [
            "--methods",
            "qlora_nf4",
            "--overrides",
            "train.max_steps=2",
            "eval.forgetting.max_tokens=1024",
            "eval.perplexity.max_tokens=1024",
            "--out",
            str(tmp_path),
        ]
    )
    assert [run["policy"] for run in report["runs"]] == ["exact", "fast", "fast", "exact"]
    [row] = report["summary"]
    assert row["figures_equal"], [run["figures"] for run in report["runs"]]
    assert row["train"]["fast_over_exact"] > 0 and row["train_peak_bytes"]["exact"] > 0
    assert json.loads((tmp_path / "bench_heap.json").read_text())["summary"] == report["summary"]
    assert "qlora_nf4" in (tmp_path / "bench_heap.md").read_text()
