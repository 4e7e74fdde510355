"""Sweeps as a user runs them: the paper-table experiments compose, the launchers are one
override away, and a sweep on the local launcher is resumable and writes only where it should.

The same sweeps on a real Slurm cluster are in tests/test_slurm.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException

from experiments.harness.plan import check_eval, instantiate_method
from experiments.harness.record import read_record
from experiments.harness.train import TrainSettings
from tests.conftest import CONF, REPO, compose_config, kill_cli_when, run_cli

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER_TABLES = ("qlora_table4", "qalora_table1", "datatypes")
FAST = ("model=llama_synthetic", "train.max_steps=2", "method.lora.r=4", "threads=1")


def compose_hydra(*overrides: str):
    """The config a job sees, with its ``hydra`` node (sweeper params, launcher)."""
    return compose_config(*overrides, hydra_node=True)


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The override lists of the jobs ``-m experiment=<experiment>`` launches, as Hydra's basic sweeper makes them."""
    params = compose_hydra(f"experiment={experiment}").hydra.sweeper.params or {}
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    [jobs] = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return [[f"experiment={experiment}", *job] for job in jobs]


def compose_job(job: list[str]):
    return compose_config(*job)


def missing_method(error: MissingConfigException) -> str | None:
    """The method a job names whose conf/method/<name>.yaml does not exist (yet), else None."""
    missing = str(error.missing_cfg_file or "")
    name = missing.removeprefix("method/")
    if missing.startswith("method/") and not (CONF / "method" / f"{name}.yaml").exists():
        return name
    return None


# ----------------------------------------------------------------------------- experiment files


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_every_experiment_composes_into_a_valid_run(experiment):
    jobs = sweep_jobs(experiment)
    assert len(jobs) > 1, f"experiment={experiment} is not a sweep"
    absent, results_dirs, configs = set(), set(), []
    for job in jobs:
        try:
            cfg = compose_job(job)
        except MissingConfigException as error:
            name = missing_method(error)
            if name is None:
                raise
            absent.add(name)  # a method being added in parallel: checked the day its file lands
            continue
        assert cfg.experiment_name == experiment, job
        instantiate_method(cfg)
        TrainSettings(**cfg.train)
        check_eval(cfg)
        results_dirs.add(cfg.results_dir)
        configs.append(cfg)
    assert results_dirs == {f"results/runs/{experiment}"}  # one table, one folder of records, git-ignored
    if absent:
        pytest.skip(
            f"experiment={experiment}: {len(configs)} of {len(jobs)} jobs composed; "
            f"no conf/method/ file yet for {', '.join(sorted(absent))}"
        )


def test_each_paper_table_has_a_small_preset_for_this_machine():
    for table in PAPER_TABLES:
        assert table in EXPERIMENTS and f"{table}_small" in EXPERIMENTS
        for job in sweep_jobs(f"{table}_small"):
            assert compose_job(job).model.name == "smollm2_135m", job  # offline, CPU-sized


def test_qlora_table4_is_the_papers_layout_and_settings():
    jobs = sweep_jobs("qlora_table4")
    configs = [compose_job(job) for job in jobs]
    assert {c.method.name for c in configs} == {"lora_bf16", "qlora_fp4", "qlora_nf4", "qlora_nf4_dq"}
    assert {c.model.name_or_path for c in configs} == {"huggyllama/llama-7b", "huggyllama/llama-13b"}
    assert {c.data.source for c in configs} == {"alpaca"}
    assert len(jobs) == 4 * 2
    for c in configs:
        assert (c.train.max_steps, c.train.lr, c.train.batch_size * c.train.grad_accum) == (10000, 2e-4, 16)
        assert (c.method.lora.r, c.method.lora.alpha, c.eval.num_fewshot) == (64, 16, 5)


def test_qalora_table1_rows_are_methods_at_4_3_2_bits_with_group_size_32():
    rows = {}
    for job in sweep_jobs("qalora_table1"):
        try:
            c = compose_job(job)
        except MissingConfigException as error:
            if missing_method(error) is None:
                raise
            continue
        assert (c.train.max_steps, c.train.lr) == (10000, 2e-5)
        rows.setdefault(c.method.name, set()).add((c.method.get("bits"), c.method.get("group_size")))
    # QA-LoRA on a GPTQ base, as the paper runs it: its name follows from the axes (methods/compose.py)
    for method in ("qlora_gptq", "qalora_gptq"):
        assert rows[method] == {(4, 32), (3, 32), (2, 32)}
    assert rows["qlora_nf4"] == {(None, None)}  # NF4 is 4-bit only
    assert rows["base_bf16"] == {(None, None)}  # the base model, no fine-tuning


def test_datatypes_evaluates_the_quantized_base_without_fine_tuning():
    configs = [compose_job(job) for job in sweep_jobs("datatypes_small")]
    assert {c.method.name for c in configs} == {"base_bf16", "qlora_fp4", "qlora_nf4", "qlora_nf4_dq", "rtn", "gptq"}
    assert all(c.train.max_steps == 0 and c.eval.perplexity.enabled and c.eval.fidelity.enabled for c in configs)
    rtn = {(c.method.bits, c.method.group_size) for c in configs if c.method.name == "rtn"}
    assert rtn == {(bits, group) for bits in (4, 3, 2) for group in (32, 64)}
    [gguf] = [list(c.export.formats) for c in configs if c.export.formats]
    assert gguf == ["gguf_q8_0", "gguf_q5_1", "gguf_q4_1", "gguf_q4_0"]  # exports of the 16-bit base


# ----------------------------------------------------------------------------- launchers


def test_local_launcher_is_the_default_and_slurm_is_one_override_away():
    assert compose_hydra().hydra.launcher._target_.endswith("BasicLauncher")
    stock = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert compose_hydra("hydra/launcher=submitit_slurm").hydra.launcher._target_ == stock
    # the project's preset: the same launcher, plus a failed record for a job Slurm killed
    # (tests/test_slurm.py runs it on a real cluster)
    assert (
        compose_hydra("launcher=slurm").hydra.launcher._target_
        == "hydra_plugins.qpeft_slurm.launcher.RecordingSlurmLauncher"
    )
    slurm = compose_hydra("launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm.partition == "gpu" and slurm.gpus_per_task == 1 and slurm.mem_gb > 0
    assert slurm.timeout_min > 10 and slurm.array_parallelism > 0 and slurm.setup
    assert slurm.max_num_timeout > 0  # a timed-out job is requeued and resumes from its checkpoint


class FakeSlurmJob:
    """What ``_JobOrLoss`` asks of a submitit job: its results, its result file and the cluster's state of it,
    here a job Slurm requeued: read once as FAILED while the requeue was in flight, then PENDING, then done."""

    def __init__(self, tmp_path: Path, states: list[str]):
        self.job_id, self.states, self.cleared, self.read_mid_requeue = "7_0", states, 0, True
        self.paths = type("Paths", (), {"result_pickle": tmp_path / "7_0_result.pkl"})()
        self.watcher = self

    def results(self):
        from submitit.core.utils import UncompletedJobError

        ended = UncompletedJobError("Job 7_0 has not produced any output (state: FAILED)")
        if self.read_mid_requeue:  # submitit's first read, while the requeue was in flight
            self.read_mid_requeue = False
            raise ended
        while not self.paths.result_pickle.exists():  # submitit waits while Slurm says it is queued or running
            if self.get_state(self.job_id) not in ("PENDING", "RUNNING", "COMPLETED"):
                raise ended
        return ["the run's own result"]

    def clear(self):
        self.cleared += 1

    def get_state(self, job_id, mode="standard"):
        state = self.states.pop(0)
        if state == "COMPLETED":  # the requeued job ran to its end
            self.paths.result_pickle.write_text("done")
        return state


def test_a_job_read_as_failed_while_slurm_requeues_it_is_waited_for_not_recorded_as_lost(tmp_path, monkeypatch):
    from hydra_plugins.qpeft_slurm import launcher

    monkeypatch.setattr(launcher, "REQUEUE_RECHECK_S", 0.0)
    lost = []
    monkeypatch.setattr(launcher._JobOrLoss, "record_loss", lambda self, error: lost.append(error) or "lost")
    requeued = FakeSlurmJob(tmp_path, ["PENDING", "RUNNING", "COMPLETED"])
    assert launcher._JobOrLoss(requeued, None, [], 0).results() == ["the run's own result"]
    assert not lost and requeued.cleared == 1  # asked Slurm afresh, not submitit's cached FAILED
    # a job that really ended without a result is still recorded as lost, after one more look
    (tmp_path / "dead").mkdir()
    dead = FakeSlurmJob(tmp_path / "dead", ["FAILED"])
    assert launcher._JobOrLoss(dead, None, [], 0).results() == ["lost"] and len(lost) == 1


def test_checkpoints_live_under_the_results_folder_and_out_of_git():
    cfg = compose_job(["results_dir=results/some_table"])
    assert cfg.checkpoint_dir == "results/some_table/.checkpoints"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "results/some_table/.checkpoints/x/train_state.pt"], cwd=REPO
    )
    assert ignored.returncode == 0


# ----------------------------------------------------------------------------- local sweeps


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_a_local_sweep_writes_only_its_folders_and_a_rerun_does_no_work(tmp_path):
    args = (
        "-m",
        *FAST,
        "method=lora_bf16,qlora_nf4",
        "train.checkpoint_every=1",
        "results_dir=records",
        "hydra.sweep.dir=sweep",
        "logger=wandb",
    )
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 ok, 0 failed" in first.stdout
    # every file is a record, or lies in its run's own output folder under the sweep folder
    top_level = {p.name for p in tmp_path.iterdir()}
    assert top_level == {"records", "sweep"}, top_level
    records = sorted((tmp_path / "records").glob("*.json"))
    assert len(records) == 2 and all(read_record(p)["status"] == "ok" for p in records)
    assert files_under(tmp_path / "records") == {p.name for p in records}  # checkpoints removed when done
    wandb_runs = {p.parent.parent.parent.name for p in (tmp_path / "sweep").glob("*/wandb/offline-run-*/files")}
    assert len(wandb_runs) == 2  # each run's wandb files in its own output folder

    created = {p.name: read_record(p)["created_at"] for p in records}
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 ok, 0 failed" in again.stdout
    if read_record(records[0])["env"]["git_dirty"] is False:  # a clean commit (as in CI): nothing is redone
        assert again.stdout.count("skip ") == 2
        assert {p.name: read_record(p)["created_at"] for p in sorted((tmp_path / "records").glob("*.json"))} == created
    else:  # uncommitted changes: done again, the first records kept under superseded/
        assert again.stdout.count("not a clean git commit") == 2
        assert len(list((tmp_path / "records" / "superseded").glob("*.json"))) == 2


def test_a_run_killed_mid_training_continues_from_its_checkpoint_when_the_sweep_is_rerun(tmp_path):
    args = (
        "-m",
        "model=llama_synthetic",
        "method=lora_bf16",
        "method.lora.r=4",
        "threads=1",
        "train.max_steps=150",
        "train.checkpoint_every=5",
        "results_dir=records",
        "hydra.sweep.dir=sweep",
    )
    checkpoints = tmp_path / "records" / ".checkpoints"
    # a crash, an OOM kill, a lost node: no record, no cleanup
    kill_cli_when(lambda: list(checkpoints.glob("*/train_state.pt")), *args, cwd=tmp_path, timeout=120)
    assert list(checkpoints.glob("*/train_state.pt")), "no checkpoint was written before the kill"
    assert not list((tmp_path / "records").glob("*.json"))

    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [path] = (tmp_path / "records").glob("*.json")
    record = read_record(path)
    assert record["status"] == "ok" and record["train"]["steps"] == 150
    assert 0 < record["train"]["resumed_from_step"] < 150
    assert len(record["train"]["losses"]) == 150  # the losses before the kill come back with the checkpoint
    assert not list(checkpoints.glob("*/train_state.pt"))
