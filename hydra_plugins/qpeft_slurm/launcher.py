"""Slurm launcher for sweeps: hydra-submitit-launcher, plus a record for a job that died.

hydra-submitit-launcher's ``launch`` returns each job's result, and re-raises when a job
ended without one: cancelled, killed by the node's OOM killer, a node failure, or a time
limit with no requeue left. One such job then ends the whole sweep with a traceback and
no summary, although the other jobs ran (and the run itself could not write its record:
it was killed). This subclass, used by ``launcher=slurm``, catches that per job, writes a
``failed`` record for the run (its run id, config, Slurm state and log path) unless a
record is there (the run's own, or one the job died before setting aside), and lets the
sweep summary list it with the others. A re-run of the sweep redoes only runs without an
ok record, so it redoes that one.

It also gives a run of N processes (``train.strategy=fsdp|ddp train.nproc=N``) a job of N tasks, one
per rank (experiments/distribution/ranks.py makes each task a rank from Slurm's environment): jobs
are submitted as one job array per number of tasks.

Hydra accepts launchers only from the ``hydra_plugins`` package, hence this location;
everything else is submitit's and hydra-submitit-launcher's own behaviour.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, open_dict


class RecordingSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        launcher, stock = self, submitit.AutoExecutor

        class Executor(stock):
            # the parent builds its executor and reads ``job.results()`` of what map_array returns
            def map_array(self, fn, *iterables):
                overrides, job_nums = iterables[0], iterables[2]  # (overrides, dir key, job number, ...)
                for o, n in zip(overrides, job_nums):
                    launcher.forget_earlier_sweeps(list(o), n)
                tasks = [launcher.tasks_per_node(list(o), n) for o, n in zip(overrides, job_nums)]
                jobs = [None] * len(tasks)
                for count in sorted(set(tasks)):  # one job array per number of tasks
                    picked = [i for i, t in enumerate(tasks) if t == count]
                    # a task that exits non-zero ends the job's others at once: a failed rank's peers would
                    # otherwise wait in their next collective until its timeout (NCCL's: 10 minutes)
                    self.update_parameters(tasks_per_node=count, srun_args=["--kill-on-bad-exit=1"])
                    submitted = super().map_array(fn, *[[column[i] for i in picked] for column in iterables])
                    for i, job in zip(picked, submitted):
                        jobs[i] = job
                return [_JobOrLoss(job, launcher, list(o), n) for job, o, n in zip(jobs, overrides, job_nums)]

        submitit.AutoExecutor = Executor  # the parent looks it up when it runs; restored below
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor = stock

    def tasks_per_node(self, overrides: list[str], job_num: int) -> int:
        """One Slurm task per process of a run of several (``train.strategy=fsdp`` or ``ddp``: ``train.nproc``
        over the job's ``nodes``), each with the launcher's ``gpus_per_task``; one task for any other run."""
        try:
            train = self.job_config(overrides, job_num).train
        except Exception:  # noqa: BLE001 - a broken config: the job says what is wrong with it
            return 1
        from experiments.distribution.ranks import MULTI_PROCESS

        if train.get("strategy") not in MULTI_PROCESS:
            return 1
        return max(1, int(train.nproc) // int(self.params.get("nodes") or 1))

    def forget_earlier_sweeps(self, overrides: list[str], job_num: int) -> None:
        """Remove the run pointer an earlier sweep left in this job's folder (a sweep folder used again): a job
        that then died before planning its run would have its lost-job record named after that other run."""
        from experiments.harness.sweep_summary import POINTER_NAME

        try:
            config = self.job_config(overrides, job_num)
        except Exception:  # noqa: BLE001 - a broken config: the job says what is wrong with it
            return
        (Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir) / POINTER_NAME).unlink(missing_ok=True)

    def job_config(self, overrides: list[str], job_num: int) -> DictConfig:
        """The config the job ran with, as hydra-submitit-launcher composes it in the job."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
        return config


# What a job read as ended is asked again after, and the Slurm states that mean it is still in the queue
# (submitit's own list of unfinished states, less UNKNOWN: a job Slurm no longer knows is not waited for).
REQUEUE_RECHECK_S = 5.0
STILL_QUEUED = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "READY")


class _JobOrLoss:
    def __init__(self, job, launcher: RecordingSlurmLauncher, overrides: list[str], job_num: int):
        self.job, self.launcher, self.overrides, self.job_num = job, launcher, overrides, job_num

    def results(self) -> list[Any]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        while True:
            try:
                return self.job.results()
            except FailedJobError as error:  # the run raised: its own error says why
                return [self.record_loss(error)]
            except UncompletedJobError as error:
                if not self.back_in_queue():
                    return [self.record_loss(error)]

    def back_in_queue(self) -> bool:
        """Whether a job read as ended without a result is queued or running again, asked after a pause.

        Slurm requeues a preempted job (submitit's signal handler asks it to) through states that a status
        read at the wrong moment can take for an end: the sweep then wrote a lost-job record for a run that
        went on and finished (seen once under load on the local cluster, as FAILED). submitit caches the
        state of a job it took for finished, so the cache is cleared before asking again."""
        time.sleep(REQUEUE_RECHECK_S)
        if self.job.paths.result_pickle.exists():
            return True  # it finished meanwhile: results() reads it
        self.job.watcher.clear()
        state = (self.job.watcher.get_state(self.job.job_id, mode="force") or "UNKNOWN").split()[0]
        return state.upper() in STILL_QUEUED

    def record_loss(self, error: Exception) -> JobReturn:
        from submitit.core.utils import UncompletedJobError

        from experiments.distribution.rank_failures import describe_rank_failure, first_rank_failure
        from experiments.harness.record import lost_job_record, write_record
        from experiments.harness.sweep_summary import read_pointer, write_pointer

        state = (self.job.state or "UNKNOWN").split()[0]  # "CANCELLED by 0" -> CANCELLED
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # an uncompleted job's error says why in its first line; a job that raised, in its last
        reason = lines[0] if isinstance(error, UncompletedJobError) else lines[-1]
        config = self.launcher.job_config(self.overrides, self.job_num)
        output_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        failure = first_rank_failure(output_dir)  # a rank of several that failed first, ending the job
        if failure is not None:
            reason = describe_rank_failure(failure)
        message = (
            f"Slurm job {self.job.job_id} ended {state} before the run finished its record "
            f"(log: {self.job.paths.stdout}): {reason.strip()}"
        )
        task_config = copy.deepcopy(config)
        with open_dict(task_config):
            del task_config["hydra"]
        # The run's own id, which it left on being planned (with compute_dtype auto resolved on its node:
        # the login node may have another CPU or no GPU). A job that died before its plan has no run id:
        # no record is written under a guessed one, and the next sweep runs it.
        planned = read_pointer(output_dir) or {}
        if not planned.get("run_id"):
            why = planned.get("error") or "it died before its run was planned, so no record: a sweep re-run runs it"
            error = f"{message}; {why}"
            write_pointer(output_dir, None, None, error=error)
            return self._returned(config, task_config, output_dir, {"status": "invalid", "error": error})
        run_id = planned["run_id"]
        if planned.get("compute_dtype") and "compute_dtype" in task_config.method:
            task_config.method.compute_dtype = planned["compute_dtype"]
        record_path = Path(task_config.results_dir) / f"{run_id}.json"
        # Only where there is no record. A run sets aside any record it will not keep before it starts
        # (experiments.harness.pipeline.skip_or_set_aside), so a record there is the job's own (it died after
        # writing it) or
        # one the job never got to: it died while it checked it (a re-run's job skipping an ok record) or before,
        # with an earlier sweep's pointer in its folder. Writing over that one lost an ok record, and the next
        # sweep trained the run again from step 0 (benchmarks/chaos_sweep.py: a re-run's job preempted as it
        # started). It stands; the summary lists it, and the next sweep decides about it as always.
        if not record_path.exists():
            write_record(lost_job_record(task_config, run_id, state, message, self.job.job_id), record_path)
        write_pointer(output_dir, run_id, record_path)
        return self._returned(
            config, task_config, output_dir, {"record_path": str(record_path), "status": "failed", "error": message}
        )

    def _returned(self, config, task_config, output_dir: Path, value: dict) -> JobReturn:
        result = JobReturn(
            overrides=self.overrides,
            cfg=task_config,
            hydra_cfg=config,
            working_dir=str(output_dir),
            task_name=str(config.hydra.job.name),
            status=JobStatus.COMPLETED,
        )
        # COMPLETED, not FAILED: Hydra's sweeper re-raises a failed job's error and would stop
        # before the summary, which lists this run from its record.
        result.return_value = value
        return result
