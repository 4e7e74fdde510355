"""Per-phase memory on CPU: a phase reports what it found in use and its own peak above that; its log says
whether it ended or was cut short."""

import pytest
import torch

from experiments.harness.measure import PhaseMeter, limit_heap_retention


def test_a_phase_reports_its_own_growth_not_the_process_lifetime_peak():
    limit_heap_retention()
    meter = PhaseMeter(torch.device("cpu"))
    with meter.phase("big"):
        big = torch.ones(64 * 2**20)  # 256 MiB, touched
        del big
    with meter.phase("small") as small:
        torch.ones(2**20).sum()
    big_stats = meter.phases["big"]
    growth = big_stats.peak_memory_bytes - big_stats.memory_at_start_bytes
    assert growth >= 250 * 2**20
    # the second phase starts after the 256 MiB were freed, and its peak does not carry them
    assert small.peak_memory_bytes - small.memory_at_start_bytes < 64 * 2**20
    assert meter.as_dict()["small"]["memory_at_start_bytes"] == small.memory_at_start_bytes


def test_a_phase_cut_short_says_so_in_the_log_instead_of_done(caplog):
    """A preempted job leaves its phase through SystemExit (submitit's handler): the log must not call a training
    cut at its first step "done" (benchmarks/chaos_sweep.py reads these lines)."""
    meter = PhaseMeter(torch.device("cpu"))
    with caplog.at_level("INFO", logger="experiments.harness.measure"), pytest.raises(SystemExit):
        with meter.phase("train"):
            raise SystemExit(-1)
    with caplog.at_level("INFO", logger="experiments.harness.measure"):
        with meter.phase("eval_mmlu"):
            pass
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "phase train: started" and messages[1].startswith("phase train: interrupted by SystemExit in")
    assert messages[3].startswith("phase eval_mmlu: done in")
