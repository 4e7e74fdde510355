"""Per-phase memory on CPU: a phase reports what it found in use and its own peak above that; its log says
whether it ended or was cut short."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.harness.measure import PhaseMeter, set_heap_policy

ROOT = Path(__file__).resolve().parents[1]


def _phase_growths(hold_s: float = 0.0) -> tuple[int, int, PhaseMeter]:
    """Two phases: one makes and frees 256 MiB (held ``hold_s``), the next does little. Their growths, and the meter."""
    set_heap_policy("exact")
    meter = PhaseMeter(torch.device("cpu"))
    with meter.phase("big") as big_stats:
        big = torch.ones(64 * 2**20)  # 256 MiB, touched
        time.sleep(hold_s)
        del big
    with meter.phase("small") as small:
        torch.ones(2**20).sum()
    big_growth, small_growth = (stats.peak_memory_bytes - stats.memory_at_start_bytes for stats in (big_stats, small))
    return big_growth, small_growth, meter


def _in_a_fresh_process(*lines: str) -> list[str]:
    """What ``lines`` print, run in a new Python process. In a long test process, memory an earlier test freed
    can still be resident (allocator caches), and a phase that reuses it rightly grows the resident set by
    nothing: the allocations these tests measure must be the process's first."""
    script = "\n".join(
        ("from experiments.harness import measure", "from tests.test_measure import _phase_growths", *lines)
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_a_phase_reports_its_own_growth_not_the_process_lifetime_peak():
    # A training phase holds its memory for seconds; 0.3 s is enough for either way of measuring (below)
    big, small, same = _in_a_fresh_process(
        "big, small, meter = _phase_growths(hold_s=0.3)",
        "small_start = meter.phases['small'].memory_at_start_bytes",
        "print(big, small, meter.as_dict()['small']['memory_at_start_bytes'] == small_start)",
    )
    assert int(big) >= 250 * 2**20
    # the second phase starts after the 256 MiB were freed, and its peak does not carry them
    assert int(small) < 64 * 2**20 and same == "True"


def test_where_the_peak_cannot_be_reset_a_sampler_still_sees_the_phase_and_only_it():
    """Containers that refuse /proc/self/clear_refs: the per-phase peak comes from sampling."""
    big, small = _in_a_fresh_process(
        "measure._reset_peak_rss = lambda: False", "print(*_phase_growths(hold_s=0.3)[:2])"
    )
    assert int(big) >= 250 * 2**20 and int(small) < 64 * 2**20


def test_an_allocation_shorter_than_a_sample_still_counts_when_it_raised_the_lifetime_peak():
    """256 MiB made and freed between two samples read as no growth at all. A fresh process (so the allocation
    raises the lifetime peak) whose sampler never gets to sample."""
    [big] = _in_a_fresh_process(
        "measure._reset_peak_rss = lambda: False",
        "measure.SAMPLE_INTERVAL_S = 3600.0",
        "print(_phase_growths()[0])",
    )
    assert int(big) >= 250 * 2**20


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


def test_under_the_fast_heap_a_phase_does_not_count_what_an_earlier_one_freed_into_the_heap():
    """cpu_heap=fast keeps freed blocks under 32 MiB in the heap for reuse; the heap is trimmed as each phase
    starts, so 320 MiB an earlier phase freed there (kept: a block made after them holds the heap's top) is not
    in use for the next one."""
    kept, start = _in_a_fresh_process(
        "import torch",
        "measure.set_heap_policy('fast')",
        "meter = measure.PhaseMeter(torch.device('cpu'))",
        "with meter.phase('first'):",
        "    blocks = [torch.ones(2 * 2**20) for _ in range(40)]",  # 40 x 8 MiB, in the heap
        "    top = torch.ones(2**18)",  # 1 MiB, after them: no earlier hole holds it
        "    before = measure.current_rss_bytes()",
        "    del blocks",
        "    kept = measure.current_rss_bytes() - before",
        "with meter.phase('second'):",
        "    pass",
        "print(kept, meter.phases['first'].memory_at_start_bytes - meter.phases['second'].memory_at_start_bytes)",
    )
    assert int(kept) > -64 * 2**20  # without the trim, the freed blocks stay resident
    assert abs(int(start)) < 64 * 2**20  # the second phase starts where the first did


def test_the_heap_policies_are_the_ones_named():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="must be one of exact, fast"):
        set_heap_policy("tcmalloc")
