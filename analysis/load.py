"""Run records -> one tidy pandas DataFrame: the only reader of ``results/``.

``load_runs(path)`` reads every run record (JSON, schema in ``experiments/harness/record.py``)
under a folder, recursively, into one row per run with flat, stable column names and
proper dtypes (pandas nullable ``Int64``/``boolean``/``string``, ``float64``, UTC
timestamps). Failed and out-of-memory runs are rows like any other, with their status and
error. A file that cannot be read as a record (corrupt, truncated, not a record, or from
a schema this reader does not know) is reported by name with a ``RecordWarning`` and
skipped; it never stops the load. Tables, plots and the notebook all go through here.

Each row names its model by what the run loaded (``model``: the Hub id, a local folder
as ``<name>@<content id>``, the synthetic preset, the bundled model), never by the config
group's name (``model_config``: ``hf`` for every checkpoint). ``settings`` holds everything
in the run's config that can change a result except the seed (``experiments.harness.record.
comparison_settings``) and ``config_id`` a short hash of it: runs with one ``config_id``
differ in nothing but the seed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd

from experiments.harness.record import FINISHED, SCHEMA_VERSION, SUPERSEDED_DIR, Phase, comparison_settings

# The newest record schema this reader understands: the one experiments/harness/record.py writes.
READER_SCHEMA_VERSION = SCHEMA_VERSION
STATUSES = tuple(status.value for status in FINISHED)
MMLU_CATEGORIES = ("humanities", "stem", "social_sciences", "other")
PHASES = tuple(phase.value for phase in Phase)
# Record sections whose every scalar field also becomes a column, "<prefix>_<field>", beside
# the named columns below: a field a run starts writing appears here without an edit.
SECTION_PREFIXES = {"method": "method", "train": "train", "memory": "memory", "eval.mmlu": "mmlu",
                    "eval.perplexity": "perplexity", "env": "env"}  # fmt: skip


class RecordWarning(UserWarning):
    """A file under the results folder was skipped or read with gaps; the message names it."""


class NoRecordsError(FileNotFoundError):
    """The results folder holds no readable run record."""


def _first(record: dict, *paths: str):
    """The value at the first dotted path that is present and not None (newest layout first)."""
    for path in paths:
        node = record
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            return node
    return None


def _column_spec() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Column name -> (dtype, dotted paths in the record, tried in order).

    A fixed list, not a generic flatten, so that the columns are the same whatever the
    records hold: a table that needs ``group_size`` finds the column (empty) even when no
    run in the folder is group-quantized.
    """
    spec = {
        "run_id": ("string", ("run_id",)),
        "status": ("string", ("status",)),
        "error_type": ("string", ("error.type",)),
        "error_message": ("string", ("error.message",)),
        "schema_version": ("Int64", ("schema_version",)),
        "created_at": ("datetime", ("created_at",)),
        "finished_at": ("datetime", ("finished_at",)),
        "experiment": ("string", ("config.experiment_name",)),
        "seed": ("Int64", ("config.seed",)),
        # what was run
        "method": ("string", ("method.name", "config.method.name")),
        "method_family": ("string", ("method.family",)),
        "base": ("string", ("config.method.base",)),  # the two axes (methods/compose.py)
        "adapter": ("string", ("config.method.adapter",)),
        "quant_format": ("string", ("method.quant_format",)),
        "bits": ("Int64", ("method.bits", "config.method.bits")),
        "group_size": ("Int64", ("method.group_size", "config.method.group_size")),
        "block_size": ("Int64", ("method.block_size",)),
        "double_quant": ("boolean", ("method.double_quant", "config.method.double_quant")),
        "compute_dtype": ("string", ("method.compute_dtype", "config.method.compute_dtype")),
        "lora_r": ("Int64", ("method.lora.r", "config.method.lora.r")),
        "lora_alpha": ("float64", ("method.lora.alpha", "config.method.lora.alpha")),
        "loftq_init_rel_error": ("float64", ("method.loftq.init_rel_error",)),
        "loftq_qlora_init_rel_error": ("float64", ("method.loftq.qlora_init_rel_error",)),
        "model": ("string", ("model.id",)),  # filled by _model_identity for records from before model.id
        "model_config": ("string", ("config.model.name", "model.name")),
        "model_synthetic": ("boolean", ("model.synthetic",)),
        "data": ("string", ("config.data.source",)),
        "train_max_steps": ("Int64", ("config.train.max_steps",)),
        # storage (exact tensor bytes)
        "weight_bits_per_param": ("float64", ("method.weight_bits_per_param",)),
        "weight_bytes": ("Int64", ("memory.weight_bytes", "method.weight_bytes")),
        "quantized_linear_params": ("Int64", ("method.quantized_linear_params",)),
        "quantized_linear_bytes": ("Int64", ("method.quantized_linear_bytes",)),
        "quantization_constant_bytes": (
            "Int64",
            ("memory.quantization_constant_bytes", "method.quantization_constant_bytes"),
        ),
        "unquantized_bytes": ("Int64", ("memory.unquantized_bytes", "method.unquantized_bytes")),
        "adapter_bytes": ("Int64", ("memory.adapter_bytes", "method.adapter_bytes")),
        "optimizer_state_bytes": ("Int64", ("memory.optimizer_state_bytes",)),
        "trainable_params": ("Int64", ("method.trainable_params",)),
        # training
        "train_steps": ("Int64", ("train.steps",)),
        "train_tokens": ("Int64", ("train.tokens",)),
        "train_tokens_per_second": ("float64", ("train.tokens_per_second",)),
        "train_loss_first": ("float64", ("train.loss_first",)),
        "train_loss_last": ("float64", ("train.loss_last",)),
        "train_peak_memory_bytes": ("Int64", ("train.peak_memory_bytes", "phases.train.peak_memory_bytes")),
        "train_wall_s": ("float64", ("train.wall_s", "phases.train.wall_s")),
        "train_losses": ("object", ("train.losses",)),
        "adapter_file_bytes": ("Int64", ("train.adapter_file.bytes",)),  # the trained adapter as saved
        # evaluation
        "mmlu_acc": ("float64", ("eval.mmlu.acc",)),
        "mmlu_acc_subject_mean": ("float64", ("eval.mmlu.acc_subject_mean",)),
        # the configured shots when evaluation never ran, so a failed run lands in its column
        "mmlu_num_fewshot": ("Int64", ("eval.mmlu.num_fewshot", "config.eval.num_fewshot")),
        "mmlu_n_questions": ("Int64", ("eval.mmlu.n_questions",)),
        "mmlu_backend": ("string", ("eval.mmlu.backend",)),
        # each question's mark and what names the questions (paired comparisons: analysis/tables/paired.py)
        "mmlu_correct": ("string", ("eval.mmlu.per_question.correct",)),
        "mmlu_questions": ("string", ("eval.mmlu.per_question.questions",)),
        "perplexity": ("float64", ("eval.perplexity.perplexity",)),
        "perplexity_n_tokens": ("Int64", ("eval.perplexity.n_tokens",)),
        "perplexity_source": ("string", ("eval.perplexity.source",)),
        "perplexity_blocks": ("object", ("eval.perplexity.blocks",)),  # sums by block of positions
        # the loss on general text as training starts and after it (experiments/evaluation/forgetting.py)
        "forgetting": ("float64", ("eval.forgetting.forgetting",)),
        "general_loss_before": ("float64", ("eval.forgetting.loss_before",)),
        "general_loss_after": ("float64", ("eval.forgetting.loss_after",)),
        "forgetting_source": ("string", ("eval.forgetting.source",)),
        "forgetting_blocks": ("object", ("eval.forgetting.blocks",)),  # the after-loss's sums by block
        # fidelity against the 16-bit base (experiments/evaluation/fidelity.py)
        "kl_vs_base_mean": ("float64", ("eval.fidelity.vs_base.kl_mean",)),
        "kl_vs_base_median": ("float64", ("eval.fidelity.vs_base.kl_median",)),
        "kl_vs_base_p99": ("float64", ("eval.fidelity.vs_base.kl_p99",)),
        "kl_vs_base_max": ("float64", ("eval.fidelity.vs_base.kl_max",)),
        "top_token_agreement_vs_base": ("float64", ("eval.fidelity.vs_base.top_token_agreement",)),
        "kl_vs_base_blocks": ("object", ("eval.fidelity.vs_base.blocks",)),
        # deploy formats: export name -> sub-record (load_exports makes them rows)
        "exports": ("object", ("exports",)),
        # where it ran
        "device": ("string", ("env.device",)),
        "device_name": ("string", ("env.device_name",)),
        "torch_threads": ("Int64", ("env.torch_threads",)),
        "cpu_heap": ("string", ("env.cpu_heap",)),  # "fast": CPU peaks are upper bounds (measure.set_heap_policy)
        "git_commit": ("string", ("env.git_commit",)),
        "git_dirty": ("boolean", ("env.git_dirty",)),
        "slurm_job_id": ("string", ("slurm.job_id",)),
        # what makes two runs one configuration (filled by _row)
        "config_id": ("string", ()),
        "settings": ("object", ()),
    }
    for category in MMLU_CATEGORIES:
        spec[f"mmlu_{category}_acc"] = ("float64", (f"eval.mmlu.categories.{category}.acc",))
        spec[f"mmlu_{category}_n"] = ("Int64", (f"eval.mmlu.categories.{category}.n",))
    for phase in PHASES:
        spec[f"phase_{phase}_wall_s"] = ("float64", (f"phases.{phase}.wall_s",))
        spec[f"phase_{phase}_peak_memory_bytes"] = ("Int64", (f"phases.{phase}.peak_memory_bytes",))
    spec["path"] = ("string", ())  # filled from the file name, relative to the folder read
    return spec


COLUMNS = _column_spec()
_NAMED_PATHS = {path for _, paths in COLUMNS.values() for path in paths}


def _section_columns(record: dict) -> dict:
    """The scalar fields of the record's sections that no named column reads, as "<prefix>_<field>"."""
    columns = {}
    for section, prefix in SECTION_PREFIXES.items():
        values = _first(record, section)
        for key, value in values.items() if isinstance(values, dict) else ():
            name = f"{prefix}_{key}"
            if f"{section}.{key}" in _NAMED_PATHS or name in COLUMNS or isinstance(value, dict | list):
                continue
            columns[name] = value
    return columns


def _problem(record) -> str | None:
    """Why ``record`` cannot be read as a run record, or None when it can."""
    if not isinstance(record, dict):
        return f"not a run record (top level is {type(record).__name__}, expected an object)"
    if "status" not in record or "run_id" not in record:
        return "not a run record (no 'run_id' or 'status')"
    version = record.get("schema_version")
    if version is None:
        # Records from before the version field: readable when the identifying keys are there.
        if _first(record, "method.name", "config.method.name") is None:
            return "schema without a version and without a method name: cannot be read"
    elif not isinstance(version, int) or version > READER_SCHEMA_VERSION:
        return (
            f"schema_version {version!r} is newer than this reader ({READER_SCHEMA_VERSION}); update analysis/load.py"
        )
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {STATUSES} (a run that never finished?)"
    return None


def _format_from_config(record: dict) -> tuple[str | None, str | None]:
    """(family, quant_format) from the resolved method config, for a schema-1 run that failed before
    ``Method.describe`` wrote the ``method`` block (schema 2 writes it when the run starts)."""
    method = _first(record, "config.method") or {}
    target = str(method.get("_target_", ""))
    family = target.split(".")[1] if target.count(".") >= 2 else None
    if method.get("quant_type"):  # bitsandbytes 4-bit (QLoRA)
        return family, method["quant_type"] + ("+dq" if method.get("double_quant") else "")
    if method.get("bits") and method.get("group_size"):  # group-wise integer (GPTQ, QA-LoRA)
        return family, f"int{method['bits']}-g{method['group_size']}"
    return family, method.get("dtype")  # 16-bit LoRA


def _model_identity(record: dict) -> str | None:
    """``model.id``; for a record written before it, the closest name the record holds:
    the resolved folder or Hub id a checkpoint run loaded, the synthetic preset's model
    name, or the bundled model's name. (A folder is then named by its full path, not
    ``<name>@<content id>``: the folder may have changed since.)"""
    kind = _first(record, "config.model.kind")
    if kind == "hf":
        return _first(record, "model.id", "model.source", "config.model.name_or_path")
    if kind == "synthetic" and _first(record, "model.name") is None:  # failed before the model block
        return f"{_first(record, 'config.model.name')}_{_first(record, 'config.model.preset')}"
    return _first(record, "model.id", "model.name", "config.model.name")


def _settings(record: dict, model_id: str | None) -> tuple[dict, str]:
    settings = comparison_settings(_first(record, "config") or {}, model_id)
    text = json.dumps(settings, sort_keys=True, default=str)
    return settings, hashlib.sha256(text.encode()).hexdigest()[:10]


def _row(record: dict) -> dict:
    row = {**_section_columns(record), **{name: _first(record, *paths) for name, (_, paths) in COLUMNS.items()}}
    row["model"] = _model_identity(record)
    row["settings"], row["config_id"] = _settings(record, row["model"])
    if row["quant_format"] is None or row["method_family"] is None:
        family, quant_format = _format_from_config(record)
        row["method_family"] = row["method_family"] or family
        row["quant_format"] = row["quant_format"] or quant_format
    if row["bits"] is None and row["quant_format"] in ("bfloat16", "float16"):
        row["bits"] = 16
    elif row["bits"] is None and row["quant_format"] in ("nf4", "nf4+dq", "fp4"):
        row["bits"] = 4
    return row


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for name, (dtype, _) in COLUMNS.items():
        if dtype == "datetime":
            frame[name] = pd.to_datetime(frame[name], utc=True, errors="coerce", format="ISO8601")
        elif dtype == "float64":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
        elif dtype == "Int64":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("Int64")
        elif dtype != "object":
            frame[name] = frame[name].astype(dtype)
    return frame


def _record_files(root: Path) -> list[Path]:
    # Temp files of an atomic write in progress start with a dot: never half a record.
    # superseded/: records a later run of the same configuration replaced (experiments.harness.record.set_aside)
    return sorted(
        p
        for p in root.rglob("*.json")
        if p.is_file() and not p.name.startswith(".") and SUPERSEDED_DIR not in p.relative_to(root).parts
    )


def load_runs(path: str | Path) -> pd.DataFrame:
    """Every run record under ``path`` (a folder, read recursively, or one JSON file).

    Returns one row per run, sorted by method, model, data, seed and run id, with the
    columns of ``COLUMNS`` and then every other scalar field of the record's sections
    (``SECTION_PREFIXES``). Raises ``NoRecordsError`` when nothing readable is found.
    """
    root = Path(path)
    if not root.exists():
        raise NoRecordsError(f"results folder {root} does not exist")
    files = [root] if root.is_file() else _record_files(root)
    rows, skipped = [], []
    for file in files:
        name = file.name if file == root else str(file.relative_to(root))
        try:
            record = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            skipped.append(name)
            warnings.warn(f"skipped {file}: corrupt or partial JSON ({error})", RecordWarning, stacklevel=2)
            continue
        problem = _problem(record)
        if problem is not None:
            skipped.append(name)
            warnings.warn(f"skipped {file}: {problem}", RecordWarning, stacklevel=2)
            continue
        if record.get("schema_version") is None:
            warnings.warn(
                f"{file}: record without schema_version read as the oldest layout; missing fields are left empty",
                RecordWarning,
                stacklevel=2,
            )
        rows.append({**_row(record), "path": name})
    if not rows:
        detail = f" ({len(skipped)} unreadable file(s) skipped: {', '.join(skipped)})" if skipped else ""
        raise NoRecordsError(f"no run records (*.json) found under {root}{detail}")
    extra = sorted({name for row in rows for name in row} - set(COLUMNS))
    frame = _typed(pd.DataFrame(rows, columns=[*COLUMNS, *extra]))
    for name in extra:  # typed as pandas infers them: numbers, strings, booleans, nullable
        frame[name] = frame[name].convert_dtypes()
    order = ["method", "model", "data", "seed", "run_id"]
    return frame.sort_values(order, na_position="last", kind="mergesort").reset_index(drop=True)


# An export's figures (experiments/deploy/export.py) -> column in load_exports' rows.
EXPORT_COLUMNS = {
    "export_status": ("string", "status"),
    "export_error": ("string", "error.message"),
    "export_bytes": ("Int64", "bytes"),
    "export_bits_per_param": ("float64", "bits_per_param"),
    "export_weight_bits_per_param": ("float64", "weight_bits_per_param"),
    "export_perplexity": ("float64", "perplexity"),
    "export_mmlu_acc": ("float64", "mmlu_acc"),
    "export_mmlu_n_questions": ("Int64", "mmlu_n_questions"),
    **{
        f"export_{measure}_vs_{reference}": ("float64", f"vs_{reference}.{field}")
        for reference in ("trained", "base")
        for measure, field in (
            ("kl_mean", "kl_mean"),
            ("kl_median", "kl_median"),
            ("kl_p99", "kl_p99"),
            ("kl_max", "kl_max"),
            ("top_token_agreement", "top_token_agreement"),
        )
    },
    "export_wall_s": ("float64", "wall_s"),
    # a GGUF file scored by llama.cpp itself, where llama-cpp-python was installed
    "export_llama_cpp_perplexity": ("float64", "llama_cpp.perplexity"),
    **{
        f"export_llama_cpp_{measure}_vs_{reference}": ("float64", f"llama_cpp.vs_{reference}.{measure}")
        for reference in ("trained", "base")
        for measure in ("kl_mean", "kl_p99", "top_token_agreement")
    },
}


def load_exports(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, export format) of ``load_runs``' frame: the run's columns, ``export`` (the
    format's name) and the export's figures (``EXPORT_COLUMNS``). Runs without exports give no row."""
    rows = []
    for run in runs.to_dict("records"):
        exports = run.get("exports")
        for name, sub in (exports or {}).items() if isinstance(exports, dict) else ():
            figures = {column: _first(sub, path) for column, (_, path) in EXPORT_COLUMNS.items()}
            rows.append({**run, "export": name, **figures})
    frame = pd.DataFrame(rows, columns=[*runs.columns, "export", *EXPORT_COLUMNS])
    frame["export"] = frame["export"].astype("string")
    for column, (dtype, _) in EXPORT_COLUMNS.items():
        if dtype == "string":
            frame[column] = frame[column].astype("string")
        else:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(dtype)
    return frame
