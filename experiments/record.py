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


def environment(device: torch.device) -> dict:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
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
