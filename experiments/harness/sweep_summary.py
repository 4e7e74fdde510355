"""Hydra callback: after a multirun, print the comparison table and list what failed and why.

Each run leaves ``run_pointer.json`` (run id, record path) in its own output folder; the
callback reads those under the sweep folder, so it works the same whether the runs ran
in this process (basic launcher) or as Slurm jobs (submitit launcher).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from experiments.harness.record import Status, read_record
from experiments.harness.summary import format_table

POINTER_NAME = "run_pointer.json"


def write_pointer(
    output_dir: Path,
    run_id: str | None,
    record_path: Path | None,
    error: str | None = None,
    compute_dtype: str | None = None,
):
    """Leave the run's record path (or, for a job whose config was rejected, the error) in its folder. A run
    leaves it as soon as it is planned too, with the compute dtype ``auto`` resolved to: a Slurm job that
    dies later gets its lost-job record under the run's own id (hydra_plugins/qpeft_slurm)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    pointer = {"run_id": run_id, "record_path": str(record_path.resolve()) if record_path else None, "error": error}
    if compute_dtype is not None:
        pointer["compute_dtype"] = compute_dtype
    scratch = output_dir / (POINTER_NAME + ".partial")
    scratch.write_text(json.dumps(pointer))
    scratch.replace(output_dir / POINTER_NAME)  # whole or absent: the launcher may read it after a kill


def read_pointer(output_dir: Path) -> dict | None:
    """The pointer a run left in ``output_dir``, or None."""
    path = output_dir / POINTER_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def load_reference(folder: str | None) -> dict[str, dict]:
    """The committed reference records of an experiment (``reference_results``), by run id: the run id
    comes from the configuration alone, so a reference row is the same configuration run elsewhere."""
    if not folder or not Path(folder).is_dir():
        return {}
    records = [read_record(p) for p in sorted(Path(folder).glob("*.json"))]
    return {r["run_id"]: r for r in records if r.get("status") == Status.OK}


def describe_reference(folder: str, reference: dict[str, dict]) -> str:
    envs = {
        ((r.get("env") or {}).get("git_commit") or "?")[:7] + " on " + str((r.get("env") or {}).get("device_name"))
        for r in reference.values()
    }
    return (
        f"reference rows: the committed records in {folder} ({'; '.join(sorted(envs))}); "
        "the same figures within noise mean this machine reproduces them"
    )


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        records, invalid = [], []
        for pointer in sorted(sweep_dir.glob(f"*/{POINTER_NAME}")):
            content = json.loads(pointer.read_text())
            if content.get("error"):
                invalid.append((pointer.parent.name, content["error"]))
            elif content.get("record_path") and Path(content["record_path"]).exists():
                records.append(read_record(Path(content["record_path"])))
        for job, error in invalid:
            print(f"INVALID job {job}: {error}")
        if not records and not invalid:
            print(f"\nno run records found under {sweep_dir}")
            return
        if records:
            committed = load_reference(config.get("reference_results"))
            reference = {r["run_id"]: committed[r["run_id"]] for r in records if r.get("run_id") in committed}
            print("\n" + format_table(records, reference))
            if reference:
                print(describe_reference(config.reference_results, reference))
        failed = [r for r in records if r.get("status") != Status.OK]
        for r in failed:
            error = r.get("error") or {}
            print(f"FAILED {r['run_id']} [{r['status']}]: {error.get('type')}: {error.get('message')}")
        print(f"\n{len(records) - len(failed)} ok, {len(failed) + len(invalid)} failed")
        sys.stdout.flush()
        if failed or invalid:
            raise SystemExit(1)
