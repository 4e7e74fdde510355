"""The run record: one JSON file per run, written atomically (temp file + rename).

Schema (version 1), top-level keys: ``schema_version``, ``run_id``, ``status``
(``ok``, ``oom`` or ``failed``), ``error`` (type, message, traceback tail; null when ok),
``config`` (the full resolved Hydra config), ``env`` (package versions, git commit and
dirty flag, device, threads), ``method`` (``Method.describe``), ``model``, ``train``,
``eval`` (``mmlu``, ``perplexity``), ``memory`` (exact tensor bytes by part),
``phases`` (wall time and peak memory per phase), ``slurm`` (job ids when under Slurm),
``created_at``. ``model.id`` names the model by what was loaded (``model_identity``).

This module also says which config keys can change a result (``NOT_RESULT_KEYS`` and
``comparison_settings``): the run id and the tables' grouping both rest on it, and
``analysis/`` imports it, so it stays light (torch is imported only where it is used).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is heavy: analysis/ reads records without it
    import torch

SCHEMA_VERSION = 1

# Config keys (dotted) that do not change a run's results: where files go, how progress is
# logged, CPU threads, the evaluation batch size, how often a run checkpoints and logs.
# experiments/run.py's run_id_of leaves the same keys out of the run id.
NOT_RESULT_KEYS = ("results_dir", "checkpoint_dir", "skip_done", "logger", "threads", "reference_results",
                   "eval.batch_size", "train.checkpoint_every", "train.log_every")
# Left out of what makes two runs one table cell, besides NOT_RESULT_KEYS: the seed (a cell
# is the mean over seeds), the experiment's name (a label), the device asked for (the device
# used is in ``env``; a table marks a cell whose runs used different devices) and the model's
# path as written in the config (relative to where the run started: ``model.id`` names it).
NOT_COMPARED_KEYS = ("seed", "experiment_name", "device", "model.name_or_path")

# How much of a checkpoint file model_identity reads: the whole file when small, else this
# many chunks spread over it, so that naming a 13 GB checkpoint takes milliseconds.
SAMPLED_CHUNKS = 32
CHUNK_BYTES = 1 << 16

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


def cpuinfo_field(name: str) -> str | None:
    """The first CPU's ``name`` field in /proc/cpuinfo ("model name", "flags"), None where there is none."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows: CPUs of one machine type differ
    (AVX2 only or native bfloat16), and so do their speeds and bf16 rounding."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import torch

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


def without_keys(config: dict, dotted: Iterable[str]) -> dict:
    """A copy of a nested ``config`` without the keys at the ``dotted`` paths (absent ones are fine)."""
    kept = json.loads(json.dumps(config, default=str))
    for path in dotted:
        *parents, last = path.split(".")
        node = kept
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return kept


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists stay values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def comparison_settings(config: dict, model_id: str | None) -> dict:
    """Everything in a resolved config that can change a result except the seed, flat
    (dotted keys), with the model named by what was loaded: two runs are seeds of one
    table cell only if these are equal."""
    settings = flatten(without_keys(config, (*NOT_RESULT_KEYS, *NOT_COMPARED_KEYS)))
    settings["model.id"] = model_id
    return settings


def model_identity(kind: str, spec) -> str:
    """The model a run loaded, by name: the Hub id, a local folder as ``<name>@<content id>``,
    the synthetic preset (``llama_synthetic_<preset>``) or the bundled model's name.

    ``spec`` is an ``experiments.models.ModelSpec`` (its ``name`` and ``source``).
    """
    if kind != "hf":
        return spec.name
    folder = Path(spec.source)
    return f"{folder.name}@{folder_digest(folder)}" if folder.is_dir() else spec.source


def folder_digest(folder: Path) -> str:
    """A short id of a checkpoint folder: its resolved path, and each top-level file's name,
    size and sampled content. The path keeps two folders apart even when they hold copies;
    the content tells a checkpoint overwritten in place from the one that was there."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        size = file.stat().st_size
        digest.update(f"\0{file.name}\0{size}\0".encode())
        digest.update(_sampled_content(file, size))
    return digest.hexdigest()[:8]


def _sampled_content(file: Path, size: int) -> bytes:
    with open(file, "rb") as handle:
        if size <= SAMPLED_CHUNKS * CHUNK_BYTES:
            return handle.read()
        chunks = []
        for i in range(SAMPLED_CHUNKS):  # evenly spread, the first and last chunk included
            handle.seek((size - CHUNK_BYTES) * i // (SAMPLED_CHUNKS - 1))
            chunks.append(handle.read(CHUNK_BYTES))
        return b"".join(chunks)


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


def set_aside(path: Path, old: dict) -> Path:
    """Move the record ``old``, read from ``path``, into ``superseded/`` beside it, under a name that never
    collides."""
    stamp = (old.get("finished_at") or old.get("created_at") or "").replace(":", "").replace("-", "")[:15]
    commit = ((old.get("env") or {}).get("git_commit") or "nogit")[:10]
    folder = path.parent / SUPERSEDED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / f"{path.stem}.{commit}.{stamp}.json", 1
    while target.exists():
        target, n = folder / f"{path.stem}.{commit}.{stamp}.{n}.json", n + 1
    os.replace(path, target)
    return target
