"""Sweeps on a real Slurm cluster, as a user runs them on theirs.

A session fixture (``slurm_env``, tests/conftest.py) starts a single-node Slurm on this machine
with scripts/slurm_local.sh (own ports, own munge socket, stopped by PID at the end) and the tests run
``python -m experiments.run -m ... hydra/launcher=submitit_slurm`` against it: records
of ok runs with their Slurm ids, a failed run that does not stop the others, a job
preempted mid-training that is requeued and continues from its checkpoint, and a re-run
that does no work. Skipped only when the Slurm packages cannot be installed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from experiments.harness.record import read_record
from tests.conftest import REPO

TINY = ("model=llama_synthetic", "method.lora.r=4", "threads=1")
SLURM = ("hydra/launcher=submitit_slurm",)
# The project's launcher (launcher=slurm) on this cluster: no GPUs (a GPU cluster gives each task one), no
# memory limit, one CPU per task
PROJECT_LAUNCHER = (
    "launcher=slurm",
    "hydra.launcher.gpus_per_task=null",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.cpus_per_task=1",
)
# A sharded run of two ranks as one job of two tasks, long enough to be acted on mid-training
SHARDED_ON_SLURM = (
    *PROJECT_LAUNCHER,
    "hydra.launcher.timeout_min=30",
    *TINY,
    "method=lora_bf16",
    "train.max_steps=200",
    "train.strategy=fsdp",
    "train.nproc=2",
)


def sweep(env: dict, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_sweep(env: dict, *args: str) -> subprocess.Popen:
    """``sweep`` in the background, for a test to act on its jobs while they run."""
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", "-m", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def records_in(folder: Path) -> list[dict]:
    return [read_record(p) for p in sorted(folder.glob("*.json"))]


def job_logs(sweep_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.out"))]


def slurm(env: dict, *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30, check=True).stdout


def test_a_sweep_runs_as_a_slurm_job_array_and_a_rerun_does_no_work(slurm_env, tmp_path):
    args = (*SLURM, *TINY, "method=lora_bf16,qlora_nf4", "train.max_steps=2", f"results_dir={tmp_path / 'records'}")
    first = sweep(slurm_env, *args, f"hydra.sweep.dir={tmp_path / 'sweep1'}")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "2 ok, 0 failed" in first.stdout
    records = records_in(tmp_path / "records")
    assert [r["status"] for r in records] == ["ok", "ok"]
    slurm_ids = [r["slurm"] for r in records]
    assert {s["array_task_id"] for s in slurm_ids} == {"0", "1"}  # one array, one task per run
    assert len({s["array_job_id"] for s in slurm_ids}) == 1 and all(s["job_id"] for s in slurm_ids)
    assert all(s["restart_count"] == 0 for s in slurm_ids)

    again = sweep(slurm_env, *args, f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 ok, 0 failed" in again.stdout
    logs = job_logs(tmp_path / "sweep2")
    if records[0]["env"]["git_dirty"] is False:  # a clean commit (as in CI): the records stand
        assert len(logs) == 2 and all("already says ok" in log for log in logs)  # each job only checked its record
        assert records_in(tmp_path / "records") == records  # nothing rewritten
    else:  # uncommitted changes may change any figure: both runs are done again, the old records kept
        assert len(logs) == 2 and all("not a clean git commit" in log for log in logs)
        assert len(list((tmp_path / "records" / "superseded").glob("*.json"))) == 2


def test_a_failed_run_is_recorded_and_the_other_run_completes(slurm_env, tmp_path):
    # launcher=slurm is the project's preset; this cluster has no GPUs and a little memory per job
    result = sweep(
        slurm_env,
        *PROJECT_LAUNCHER,
        *TINY,
        "train.max_steps=2",
        "hydra.searchpath=[file://tests/conf]",
        "method=lora_bf16,broken_finalize",
        f"results_dir={tmp_path / 'records'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    statuses = {
        r["method"]["name"] if r["method"] else r["config"]["method"]["name"]: r["status"]
        for r in records_in(tmp_path / "records")
    }
    assert statuses == {"lora_bf16": "ok", "broken_finalize": "failed"}
    assert "FAILED broken_finalize" in result.stdout and "1 ok, 1 failed" in result.stdout


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_field(env: dict, job_id: str, name: str) -> str:
    line = slurm(env, "scontrol", "-o", "show", "job", job_id)
    return next(f.split("=", 1)[1] for f in line.split() if f.startswith(f"{name}="))


def preempt_the_only_job(env: dict) -> str:
    """Preempt the one job in the queue as Slurm does (submitit requeues it) and let it start again now."""
    [job_id] = slurm(env, "squeue", "-h", "-o", "%A").split()
    # what Slurm sends before preempting a job (submitit's preemption signal)
    slurm(env, "scancel", "--signal=USR2", job_id)
    wait_for(
        lambda: int(job_field(env, job_id, "Restarts")) >= 1 and job_field(env, job_id, "JobState") == "PENDING",
        60,
        "the job to be requeued",
    )
    # Slurm holds a requeued job for two minutes before it may start again; a cluster
    # with other work would start it later still. Release it now.
    slurm(env, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
    return job_id


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm_env, tmp_path):
    records, checkpoints = tmp_path / "records", tmp_path / "records" / ".checkpoints"
    # timeout_min above 10: submitit counts a signal as a time-out when the job has had
    # min(80%, limit - 10 min) of its time; this test is about preemption
    process = start_sweep(
        slurm_env,
        *SLURM,
        "hydra.launcher.timeout_min=30",
        *TINY,
        "method=lora_bf16",
        "train.max_steps=200",
        f"results_dir={records}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    try:
        # train.checkpoint_every is not set: under Slurm the run checkpoints on its own
        wait_for(
            lambda: list(checkpoints.glob("*/train_state.pt")) or process.poll() is not None,
            120,
            "a training checkpoint",
        )
        assert process.poll() is None, "the run finished before it could be preempted"
        job_id = preempt_the_only_job(slurm_env)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    [record] = records_in(records)
    assert record["status"] == "ok" and record["train"]["steps"] == 200
    assert 0 < record["train"]["resumed_from_step"] < 200
    assert record["slurm"]["restart_count"] >= 1 and record["slurm"]["job_id"] == job_id
    assert len(record["train"]["losses"]) == 200
    assert not list(checkpoints.glob("*/train_state.pt"))  # removed once the run finished


def _checkpoint_step(path: Path) -> int | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)["step"]
    except Exception:  # noqa: BLE001 - absent, or replaced while we read it: ask again
        return None


def test_a_job_requeued_after_training_does_not_train_again(slurm_env, tmp_path):
    """Preempted during evaluation (finalize and evaluate can take hours at 7B): the restarted job
    finds the final training state, skips training, and its record is ok."""
    from experiments.harness.models import synthetic_checkpoint

    records, checkpoints = tmp_path / "records", tmp_path / "records" / ".checkpoints"
    # The tiny random Llama as a local checkpoint (model=hf), so that the run evaluates MMLU
    # (synthetic models skip evaluation): 570 questions, tens of seconds on 2 cores to preempt it in
    # (the preemption follows the final checkpoint within a second).
    tiny = synthetic_checkpoint("tiny")
    process = start_sweep(
        slurm_env,
        *SLURM,
        "hydra.launcher.timeout_min=30",
        "model=hf",
        f"model.name_or_path={tiny}",
        "method.lora.r=4",
        "threads=1",
        "method=lora_bf16",
        "train.max_steps=3",
        "eval.limit_per_subject=10",
        f"results_dir={records}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    try:
        wait_for(
            lambda: (
                any(_checkpoint_step(c) == 3 for c in checkpoints.glob("*/train_state.pt"))
                or process.poll() is not None
            ),
            180,
            "the final training state",
        )
        assert process.poll() is None and not list(records.glob("*.json")), "the run ended before its evaluation"
        preempt_the_only_job(slurm_env)  # while it evaluates
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    [record] = records_in(records)
    assert record["status"] == "ok" and record["slurm"]["restart_count"] >= 1
    assert record["train"]["resumed_from_step"] == 3 == record["train"]["steps"]  # no step trained again
    assert len(record["train"]["losses"]) == 3
    assert not list(checkpoints.glob("*/train_state.pt"))  # removed once the record was written


def test_a_job_killed_before_its_record_gets_a_failed_record_and_the_sweep_its_summary(slurm_env, tmp_path):
    records = tmp_path / "records"
    # launcher=slurm (the project's launcher); two runs, the long one is cancelled mid-training
    process = start_sweep(
        slurm_env,
        *PROJECT_LAUNCHER,
        *TINY,
        "method=lora_bf16",
        "train.max_steps=2,5000",
        f"results_dir={records}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    try:
        wait_for(lambda: list(records.glob("*.json")) or process.poll() is not None, 180, "the short run's record")
        assert process.poll() is None, "the sweep ended before a job could be cancelled"
        # the short run's job may still be finishing after its record appeared
        [job_id] = wait_for(
            lambda: running if len(running := slurm(slurm_env, "squeue", "-h", "-o", "%i").split()) == 1 else None,
            60,
            "the long run's job alone in the queue",
        )
        slurm(slurm_env, "scancel", job_id)  # what a node OOM kill or an admin's scancel looks like to the run
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output[-3000:]  # a failed run fails the sweep, after its summary
    by_steps = {r["config"]["train"]["max_steps"]: r for r in records_in(records)}
    assert by_steps[2]["status"] == "ok"
    lost = by_steps[5000]
    assert lost["status"] == "failed" and lost["error"]["type"] == "SlurmJobCancelled"
    assert lost["slurm"]["job_id"] == job_id and "CANCELLED" in lost["error"]["message"]
    assert f"FAILED {lost['run_id']} [failed]: SlurmJobCancelled" in output and "1 ok, 1 failed" in output
    # under the id the run computed on its node, compute_dtype auto resolved there: a re-run supersedes it
    assert lost["config"]["method"]["compute_dtype"] in ("bfloat16", "float32")
    [planned] = [p for p in (tmp_path / "sweep").glob("*/run_pointer.json") if lost["run_id"] in p.read_text()]


def test_a_job_lost_before_its_run_is_planned_is_not_named_after_an_earlier_sweeps_run(slurm_env, tmp_path):
    """A sweep folder used again holds an earlier sweep's run pointer; a job cancelled before its run was planned
    gets no record under that other run's id (which would also have told the next sweep it had failed)."""
    import json

    from experiments.harness.sweep_summary import POINTER_NAME

    records, sweep_dir = tmp_path / "records", tmp_path / "sweep"
    earlier = {"run_id": "an-earlier-sweeps-run", "record_path": str(records / "an-earlier-sweeps-run.json")}
    job_folder = sweep_dir / "0_lora_bf16_s0"  # the job's folder (conf/config.yaml, hydra.sweep.subdir)
    job_folder.mkdir(parents=True)
    (job_folder / POINTER_NAME).write_text(json.dumps({**earlier, "error": None}))
    process = start_sweep(
        slurm_env,
        *PROJECT_LAUNCHER,
        'hydra.launcher.setup=["sleep 120"]',  # the job waits before python starts: cancelled before planning
        *TINY,
        "method=lora_bf16",
        "train.max_steps=2",
        f"results_dir={records}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    try:
        [job_id] = wait_for(
            lambda: slurm(slurm_env, "squeue", "-h", "-t", "RUNNING", "-o", "%i").split() or process.poll(),
            120,
            "the job running its setup",
        )
        slurm(slurm_env, "scancel", job_id)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output[-3000:]
    assert records_in(records) == [], "a record was written for a run this job never planned"
    assert "died before its run was planned" in output and "an-earlier-sweeps-run" not in output


def test_a_sharded_run_is_one_job_of_two_tasks_and_resumes_from_its_shards_after_preemption(slurm_env, tmp_path):
    """launcher=slurm gives train.strategy=fsdp train.nproc=2 one job of two tasks, each a rank; preempted
    mid-training, the job is requeued and both ranks resume from the sharded checkpoint."""
    records, checkpoints = tmp_path / "records", tmp_path / "records" / ".checkpoints"
    process = start_sweep(
        slurm_env, *SHARDED_ON_SLURM, f"results_dir={records}", f"hydra.sweep.dir={tmp_path / 'sweep'}"
    )
    try:
        # train.checkpoint_every is not set: under Slurm a sharded run checkpoints on its own too
        wait_for(
            lambda: list(checkpoints.glob("*/train_state.sharded/progress.pt")) or process.poll() is not None,
            120,
            "a sharded training checkpoint",
        )
        assert process.poll() is None, "the run finished before it could be preempted"
        [job_id] = slurm(slurm_env, "squeue", "-h", "-o", "%A").split()
        assert job_field(slurm_env, job_id, "NumTasks") == "2"  # one job, one task per rank
        preempt_the_only_job(slurm_env)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "1 ok, 0 failed" in output
    [record] = records_in(records)  # one record, by rank 0
    assert record["status"] == "ok" and record["env"]["distributed"]["world_size"] == 2
    assert record["slurm"]["job_id"] == job_id and record["slurm"]["restart_count"] >= 1
    assert 0 < record["train"]["resumed_from_step"] < 200 and len(record["train"]["losses"]) == 200
    assert [r["rank"] for r in record["memory"]["ranks"]] == [0, 1]
    assert not list(checkpoints.glob("*/train_state.sharded*"))  # removed once the record was written


def test_a_rank_that_fails_ends_the_whole_job_and_the_record_names_it(slurm_env, tmp_path):
    """A checkpoint that only rank 1 cannot read (its RNG state missing): rank 0 resumes and reaches its next
    collective, where it would wait for its peer until gloo's or NCCL's timeout. Rank 1's task exits
    non-zero, srun --kill-on-bad-exit ends rank 0 at once, and the record names rank 1's error."""
    import torch

    records, checkpoints = tmp_path / "records", tmp_path / "records" / ".checkpoints"
    args = (*SHARDED_ON_SLURM, f"results_dir={records}")
    first = start_sweep(slurm_env, *args, f"hydra.sweep.dir={tmp_path / 'first'}")
    try:
        [progress] = wait_for(
            lambda: list(checkpoints.glob("*/train_state.sharded/progress.pt")) or first.poll() is not None,
            120,
            "a sharded training checkpoint",
        )
        [job_id] = slurm(slurm_env, "squeue", "-h", "-o", "%A").split()
        slurm(slurm_env, "scancel", job_id)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    state = torch.load(progress, weights_only=True)
    state["rng"] = state["rng"][:1]  # rank 1 finds no RNG state of its own
    torch.save(state, progress)
    started = time.monotonic()
    again = sweep(slurm_env, *args, f"hydra.sweep.dir={tmp_path / 'again'}", timeout=300)
    assert time.monotonic() - started < 240, "the job waited for a rank that had failed"
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    [record] = [r for r in records_in(records) if r["slurm"]["job_id"] != job_id]  # the first job's is set aside
    assert record["status"] == "failed"
    assert "rank 1 failed first: IndexError" in record["error"]["message"], record["error"]
