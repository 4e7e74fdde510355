"""The run record: one JSON file per run, written atomically (temp file + rename).

Schema (version 1), top-level keys: ``schema_version``, ``run_id``, ``status``
(``ok``, ``oom`` or ``failed``), ``error`` (type, message, traceback tail; null when ok),
``config`` (the full resolved Hydra config), ``env`` (package versions, git commit and
dirty flag, device, threads), ``method`` (``Method.describe``), ``model``, ``train``,
``eval`` (``mmlu``, ``perplexity``), ``memory`` (exact tensor bytes by part),
``phases`` (wall time and peak memory per phase), ``slurm`` (job ids when under Slurm),
``created_at``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SCHEMA_VERSION = 1

PACKAGES = (
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "hydra-core",
    "lm-eval", "gptqmodel", "datasets", "wandb", "submitit", "numpy", "pandas",
)


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows: CPUs of one machine type differ
    (AVX2 only or native bfloat16), and so do their speeds and bf16 rounding."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "device": device.type,
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
    }


def slurm_info() -> dict | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_record(record: dict, path: Path) -> Path:
    """Write ``record`` as JSON to ``path`` atomically: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=False, default=str)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: Path) -> dict:
    with open(path) as handle:
        return json.load(handle)


SUPERSEDED_DIR = "superseded"  # where a record that a new run replaces is kept (analysis skips it)


def reuse_refusal(old: dict, env: dict) -> str | None:
    """Why the record ``old`` (same run id: same configuration) may not stand for a run now, or None.

    It may only if it is ok and was made by the same code on the same kind of device. Same
    code means the same git commit with a clean tree, on both sides: an uncommitted change
    could change any figure, so a dirty tree never matches, nor does a tree without git.
    The kind of device is its type and name (GPU model or CPU model).
    """
    if old.get("status") != "ok":
        return f"its status is {old.get('status')}"
    then = old.get("env") or {}
    if not env.get("git_commit") or env.get("git_dirty") is not False:
        return "this code is not a clean git commit"
    if then.get("git_commit") != env["git_commit"] or then.get("git_dirty") is not False:
        made_by = (then.get("git_commit") or "unknown")[:10] + (" (dirty)" if then.get("git_dirty") else "")
        return f"it was made by commit {made_by}, this is {env['git_commit'][:10]}"
    old_device = (then.get("device"), then.get("device_name"))
    if old_device != (env.get("device"), env.get("device_name")):
        return f"it was made on {old_device[0]} ({old_device[1]}), this is {env['device']} ({env['device_name']})"
    return None


def set_aside(path: Path) -> Path:
    """Move the record at ``path`` into ``superseded/`` beside it, under a name that never collides."""
    old = read_record(path)
    stamp = (old.get("finished_at") or old.get("created_at") or "").replace(":", "").replace("-", "")[:15]
    commit = ((old.get("env") or {}).get("git_commit") or "nogit")[:10]
    folder = path.parent / SUPERSEDED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / f"{path.stem}.{commit}.{stamp}.json", 1
    while target.exists():
        target, n = folder / f"{path.stem}.{commit}.{stamp}.{n}.json", n + 1
    os.replace(path, target)
    return target
