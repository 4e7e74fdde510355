"""The benchmark's entry point: one run = load -> adapt -> train -> finalize -> evaluate -> export -> record.

    python -m experiments.run method=qlora_nf4_dq model=smollm2_135m seed=0
    python -m experiments.run -m experiment=quickstart        # a sweep (Hydra multirun)

``plan_run`` (experiments/harness/plan.py) checks the whole config and fails within seconds on a
user error (one message, no traceback, no record); ``execute`` (experiments/harness/pipeline.py) does the
work and always ends in a record. This module only says in which process(es) that happens: this one, the
``train.nproc`` ranks it launches, one of those ranks, or one task of a Slurm job of one task per rank.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from core.errors import ConfigError
from experiments.distribution.ranks import MULTI_PROCESS, Ranks, inside_ranks, join_slurm_tasks, slurm_tasks
from experiments.harness.measure import set_heap_policy
from experiments.harness.pipeline import execute, execute_ranks, skip_or_set_aside, write_planned_pointer
from experiments.harness.plan import RunPlan, plan_run
from experiments.harness.record import Status
from experiments.harness.summary import format_table
from experiments.harness.sweep_summary import write_pointer
from methods.compose import register_method_name_resolver


def run_as_slurm_task(plan: RunPlan) -> dict:
    """One rank of a run whose Slurm job has one task per rank (``launcher=slurm``): rank 0 does
    what the launching process does under torchrun (skip or set aside an old record, point the sweep at
    the new one), every rank executes. What rank 0 returns is what the sweep reads."""
    ranks = Ranks.start(plan.device, plan.train_settings.strategy)
    if ranks.is_first:
        write_planned_pointer(plan)
    skipped = ranks.broadcast(skip_or_set_aside(plan) if ranks.is_first else None)
    if skipped is not None:
        ranks.stop()
        return skipped
    record = execute(plan)  # the same process group, stopped at its end
    if record["status"] != Status.OK:
        # Exit non-zero: Slurm then ends the job's other tasks at once (the launcher's srun has
        # --kill-on-bad-exit), instead of leaving them in a collective until its timeout. A rank other
        # than the first has left its error for the record (execute).
        error = record["error"] or {}
        raise RankFailed(f"rank {ranks.rank} of {plan.run_id}: {error.get('type')}: {error.get('message')}")
    if ranks.is_first:
        write_pointer(plan.output_dir, plan.run_id, plan.record_path)
    return {"record_path": str(plan.record_path), "status": record["status"]}


class RankFailed(RuntimeError):
    """A rank of a Slurm job of several tasks whose run failed: raised to end the task non-zero."""


def _is_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


register_method_name_resolver()  # before Hydra composes conf/ (method names follow from their axes)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    # bitsandbytes warns on every CPU start that an optional Hub-fetched kernel is missing;
    # that kernel is never reachable offline and nothing is wrong: keep the log readable.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        set_heap_policy(cfg.cpu_heap)
        if slurm_tasks() > 1:  # before the plan: it picks this rank's GPU
            join_slurm_tasks(cfg.train.strategy, cfg.train.nproc)
        plan = plan_run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        if not _is_multirun():
            sys.exit(2)
        # In a sweep one mis-specified job must not stop the others: the summary lists it.
        write_pointer(Path(HydraConfig.get().runtime.output_dir), None, None, error=str(error))
        return {"status": "invalid", "error": str(error)}  # not a record: the sweep summary's word
    several = plan.train_settings.strategy in MULTI_PROCESS
    if several and slurm_tasks() > 1:  # one task of a Slurm job of one task per rank
        return run_as_slurm_task(plan)
    if several and inside_ranks():  # one of the processes ``launch`` started: execute, the launcher reports
        record = execute(plan)
        if record["status"] != Status.OK:
            sys.exit(1)  # torchrun then stops the other ranks, which may wait in a collective
        return {"record_path": str(plan.record_path), "status": record["status"]}
    write_planned_pointer(plan)
    skipped = skip_or_set_aside(plan)
    if skipped is not None:
        return skipped
    record = execute_ranks(plan) if several else execute(plan)
    write_pointer(plan.output_dir, plan.run_id, plan.record_path)
    if not _is_multirun():
        print("\n" + format_table([record]))
        print(f"record: {plan.record_path}")
        if record["status"] != Status.OK:
            print(f"run {record['status']}: {record['error']['type']}: {record['error']['message']}", file=sys.stderr)
            sys.exit(1)
    return {"record_path": str(plan.record_path), "status": record["status"]}


if __name__ == "__main__":
    main()
