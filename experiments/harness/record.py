"""The run record: one JSON file per run, written atomically (temp file + rename).

``RunRecord`` is its layout, field by field; ``Status`` and ``Phase`` name what a run and
its phases can be, for the harness that writes records and for analysis/load.py, the one
reader. Schema version 3 (older records load the same way; version 2 writes the method's
identity, ``method_format``, when the run starts, so a failed run says what it ran; version 3
adds ``exports`` and ``eval.fidelity``):

``schema_version``, ``run_id``, ``status`` (a ``Status``), ``error`` (type, message,
traceback tail; null when ok), ``created_at``, ``config`` (the full resolved Hydra config),
``env`` (package versions, git commit and dirty flag, device, threads, compute dtype choice),
``slurm`` (job ids when under Slurm), ``model`` (``model.id`` names it by what was loaded:
``model_identity``), ``method`` (``methods.base.Method.describe``), ``train``
(``experiments.harness.train.TrainResult``), ``eval`` (``mmlu``, ``perplexity``, ``fidelity``: KL
divergence against the 16-bit base), ``exports`` (format -> its sub-record:
experiments/deploy/export.py), ``memory`` (exact
tensor bytes by part), ``phases`` (``Phase`` -> wall time and peak memory), ``finished_at``.

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
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from core.cpu import cpu_model_name
from core.errors import error_summary
from core.files import atomic_write_text

if TYPE_CHECKING:  # torch is heavy: analysis/ reads records without it
    import torch
    from omegaconf import DictConfig

SCHEMA_VERSION = 3


class Status(str, Enum):
    """What a run came to. A str, so records hold (and compare with) the plain word."""

    RUNNING = "running"  # written by no finished run: a record still says so only if its process died
    OK = "ok"
    OOM = "oom"  # out of memory: a result (this method does not fit), not a bug
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


FINISHED = (Status.OK, Status.OOM, Status.FAILED)


class Phase(str, Enum):
    """The timed phases of a run, in the order they run (``record["phases"]`` keys)."""

    FIDELITY_REFERENCE = "fidelity_reference"  # the 16-bit base's log-probabilities (cached; before load)
    CALIBRATION_DATA = "calibration_data"
    LOAD = "load"
    QUANTIZE = "quantize"  # instead of load or finalize, for the step a method quantizes in
    FORGETTING_BEFORE = "forgetting_before"  # the general-text loss as training starts (eval.forgetting)
    TRAIN = "train"
    FINALIZE = "finalize"
    EVAL_MMLU = "eval_mmlu"
    EVAL_PERPLEXITY = "eval_perplexity"
    EVAL_FIDELITY = "eval_fidelity"
    EVAL_FORGETTING = "eval_forgetting"
    EXPORT = "export"

    def __str__(self) -> str:
        return self.value


@dataclass
class RunRecord:
    """One run's record, assembled here and nowhere else; ``as_json`` is what the file holds."""

    run_id: str
    config: dict
    status: Status = Status.RUNNING
    error: dict | None = None
    created_at: str = field(default_factory=lambda: now_iso())
    env: dict | None = None
    slurm: dict | None = None
    model: dict | None = None
    method: dict | None = None
    train: dict | None = None
    eval: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    finished_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def fail(self, status: Status, error: BaseException) -> None:
        self.status = status
        self.error = error_summary(error)

    def as_json(self) -> dict:
        record = asdict(self)
        order = ("schema_version", "run_id", "status", "error", "created_at", "config", "env", "slurm", "model",
                 "method", "train", "eval", "exports", "memory", "phases", "finished_at")  # fmt: skip
        return {key: str(record[key]) if key == "status" else record[key] for key in order}


# Config keys (dotted) that do not change a run's results: where files go, how progress is
# logged, CPU threads and heap, the evaluation batch size, how often a run checkpoints and logs.
# run_id_of leaves the same keys out of the run id.
NOT_RESULT_KEYS = (
    "results_dir",
    "checkpoint_dir",
    "skip_done",
    "save_adapter",
    "logger",
    "threads",
    "cpu_heap",  # how CPU memory is measured, and how fast (the record's env says which)
    "reference_results",
    "eval.batch_size",
    "train.checkpoint_every",
    "train.log_every",
)
# Keys added after records were made, at the value that runs exactly as before the key existed: left out
# of the run id and of a table cell's settings at that value, so that the records made before them keep
# their id (a new capability at its neutral setting changes no result). Any other value is kept.
NEUTRAL_DEFAULTS = {
    "train.strategy": "single",
    "train.nproc": 1,
    "train.packing": False,
    "train.loss": "full",
    "train.kernels": "none",
    "method.kernel": "plain",  # QA-LoRA's base product: our PyTorch dequantization (methods/qalora.py)
    # the calibration draw's own seed (methods/base.py); before it, a run's seed drew its segments, so a
    # record at seed s > 0 of a GPTQ base under the same id was quantized on other segments than a new one
    "method.calibration.seed": 0,
    "export.gptq.calibration.seed": 0,
    # a whole block: neutral while it is exactly its default (off)
    "eval.forgetting": {"enabled": False, "source": "python_docs", "seq_len": 512, "max_tokens": 4096},
}
# Left out of what makes two runs one table cell, besides NOT_RESULT_KEYS: the seed (a cell
# is the mean over seeds), the experiment's name (a label), the device asked for (the device
# used is in ``env``; a table marks a cell whose runs used different devices) and the model's
# path as written in the config (relative to where the run started: ``model.id`` names it).
NOT_COMPARED_KEYS = ("seed", "experiment_name", "device", "model.name_or_path")

# How much of a checkpoint file model_identity reads: the whole file when small, else this
# many chunks spread over it, so that naming a 13 GB checkpoint takes milliseconds.
SAMPLED_CHUNKS = 32
CHUNK_BYTES = 1 << 16

# Every library whose version can change a recorded figure (kernels, tokenization, quantization, the
# exports' writers and readers), and those that run the sweep.
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "kernels",
    "peft",
    "bitsandbytes",
    "accelerate",
    "gptqmodel",
    "optimum",
    "torchao",
    "liger-kernel",
    "gguf",
    "lm-eval",
    "datasets",
    "numpy",
    "pandas",
    "hydra-core",
    "submitit",
    "wandb",
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
    repo = Path(__file__).resolve().parents[2]  # experiments/harness/record.py -> the repository
    try:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


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


def result_config(config: dict) -> dict:
    """What of a resolved ``config`` determines a run's result: without NOT_RESULT_KEYS, and without the
    NEUTRAL_DEFAULTS keys where they hold their neutral value (the run id hashes this)."""
    neutral = [key for key, value in NEUTRAL_DEFAULTS.items() if _at(config, key) == value]
    return without_keys(config, (*NOT_RESULT_KEYS, *neutral))


def _at(config: dict, dotted: str):
    """The value at a dotted path of a nested ``config`` (a whole block for a block's path); None if absent."""
    node = config
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def comparison_settings(config: dict, model_id: str | None) -> dict:
    """Everything in a resolved config that can change a result except the seed, flat
    (dotted keys), with the model named by what was loaded: two runs are seeds of one
    table cell only if these are equal."""
    settings = flatten(without_keys(result_config(config), NOT_COMPARED_KEYS))
    settings["model.id"] = model_id
    return settings


def model_identity(kind: str, spec) -> str:
    """The model a run loaded, by name: the Hub id, a local folder as ``<name>@<content id>``,
    the synthetic preset (``llama_synthetic_<preset>``) or the bundled model's name.

    ``spec`` is an ``experiments.harness.models.ModelSpec`` (its ``name`` and ``source``).
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


def write_record(record: dict | RunRecord, path: Path) -> Path:
    """Write ``record`` as JSON to ``path`` atomically: readers see the old file or the new one."""
    if isinstance(record, RunRecord):
        record = record.as_json()
    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")


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
    if old.get("status") != Status.OK:
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


def run_id_of(cfg: DictConfig, content: dict | None = None, device: str | None = None) -> str:
    """A stable id from the resolved config: same config, same id, on any machine. Keys that cannot
    change a result (``result_config``: where, how often, how fast, and new keys at their neutral value)
    are left out. ``content`` (experiments.harness.plan.content_ids) names by content what the config names
    by place: a checkpoint folder overwritten, or another MMLU file at the same path, is another run.
    ``device`` (experiments.harness.plan.device_for_id) stands for the config's where both name one device."""
    from omegaconf import OmegaConf

    config = result_config(OmegaConf.to_container(cfg, resolve=True))
    if device is not None:
        config["device"] = device
    if content:
        config["content"] = content
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.method.name}-{cfg.model.name}-s{cfg.seed}-{digest}"


def lost_job_record(cfg: DictConfig, run_id: str, state: str, message: str, job_id: str) -> dict:
    """The record of a run whose Slurm job ended before the run could write one (see hydra_plugins/qpeft_slurm)."""
    from omegaconf import OmegaConf

    return RunRecord(
        run_id,
        OmegaConf.to_container(cfg, resolve=True),
        status=Status.FAILED,
        error={"type": f"SlurmJob{state.title().replace('_', '')}", "message": message, "traceback": None},
        slurm={"job_id": str(job_id), "state": state},
        finished_at=now_iso(),
    ).as_json()
