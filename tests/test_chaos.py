"""The chaos sweep (benchmarks/chaos_sweep.py), small: a Slurm sweep whose jobs are killed and preempted in
several stages, re-run until nothing is left to do, ends with one ok record per run, none lost, and no run
trained twice.

Real processes on the local cluster of ``slurm_env`` (tests/conftest.py, shared with tests/test_slurm.py),
through the benchmark's own function, on 4 runs and 4 hits: about two and a half minutes on two cores.
"""

from __future__ import annotations

import random

import pytest

from benchmarks.chaos_sweep import ChaosSettings, plan_hits, run_chaos

RUNS, HITS = 4, 4  # hits in training, evaluation, the export, and a re-run's job that skips an ok record


def seed_whose_skip_hit_kills() -> int:
    """A seed whose plan kills the re-run's skipping job: the launcher once wrote a failed record over that
    run's ok record, which the next sweep then trained again from step 0 (a preemption there lands after
    submitit's signal handler only sometimes, and is then harmless)."""
    return next(
        seed
        for seed in range(100)
        if [(h.stage, h.action) for h in plan_hits(HITS, random.Random(seed))][-1] == ("skip", "kill")
    )


@pytest.mark.slow
def test_a_sweep_whose_jobs_are_killed_and_preempted_in_several_stages_ends_with_one_ok_record_per_run(
    slurm_env, tmp_path
):
    settings = ChaosSettings(
        runs=RUNS, kills=HITS, seed=seed_whose_skip_hit_kills(), max_steps=20, max_rounds=5, round_timeout_s=420
    )
    report = run_chaos(settings, slurm_env, tmp_path)
    failed = {check["name"]: check["detail"] for check in report["checks"] if not check["ok"]}
    assert report["passed"], failed
    fired = [hit for hit in report["hits"] if hit["job_id"]]
    assert len(fired) == HITS and {hit["action"] for hit in fired} == {"kill", "preempt"}
    stages = {hit["stage"] for hit in fired}
    assert stages == {"train", "eval", "export", "skip"}, fired  # the hits landed in four different stages
    assert report["rounds"][-1]["nothing_left"] and report["rounds_needed"] >= 2
