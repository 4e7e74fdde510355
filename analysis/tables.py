"""The comparison tables, regenerated from the run records as Markdown, CSV and LaTeX.

    python -m analysis.tables --results results/quickstart --out results/quickstart/tables

Eight tables (pandas; the Markdown and LaTeX writers are here, a few lines each, so that
the output depends on no optional package and is byte-for-byte stable):

1. ``main``: one row per method configuration: storage, peak training memory,
   throughput, trainable parameters, MMLU 0/5-shot (overall and per category),
   perplexity; mean ± std over seeds and the number of seeds.
2. ``qlora_table4``: the QLoRA paper's Table 4 layout (data type x model x fine-tuning
   data, mean 5-shot MMLU).
3. ``qalora_table1``: the QA-LoRA paper's Table 1 layout (method x bits, MMLU 0/5-shot
   per category and average).
4. ``datatype_perplexity``: quantization data type x held-out perplexity without
   fine-tuning, in the spirit of the QLoRA paper's Table 2.
5. ``datatype_fidelity``: each storage format of the base without fine-tuning (the
   methods' own and the 16-bit base's exports, GGUF) against the 16-bit base: bits/param,
   KL divergence of next-token distributions, top-token agreement, perplexity.
6. ``deploy_fidelity``: method x export format after fine-tuning: bits/param, file size,
   perplexity, KL divergence and top-token agreement against the fine-tuned model before
   export and against the 16-bit base, MMLU.
7. ``gguf_readers``: each GGUF export as transformers reads it and as llama.cpp runs it.
8. ``methods``: every method side by side, by its base format and adapter: storage, trainable
   parameters, throughput, training loss first -> last, perplexity, MMLU and the KL divergence
   against the 16-bit base (the README's all-methods table).

Published numbers come from ``analysis/reference/published.csv`` and are shown as rows
marked with their paper and table. "—" is a cell with no run (or a published value we
did not verify); "oom"/"failed" is a cell whose only runs ended so. Accuracies are in %.

A cell averages runs that differ in nothing but the seed: the same ``config_id`` of
``analysis.load`` (everything in the resolved config that can change a result, the model
named by what was loaded), apart from the shots where a table spreads them over columns.
Configurations that a table's labels do not tell apart (two learning rates, say) get rows
of their own and a Settings column naming what differs. A cell whose runs come from more
than one code version (git commit, or uncommitted changes) or device is marked ‡.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

from analysis.load import MMLU_CATEGORIES, STATUSES, NoRecordsError, load_exports, load_runs
from experiments.harness.record import Status

REFERENCE_CSV = Path(__file__).resolve().parent / "reference" / "published.csv"
MISSING = "—"
OURS = "ours"

# Display order of methods; a method not listed sorts after these, by name.
METHOD_ORDER = (
    "base_bf16", "lora_fp16", "lora_bf16", "dora_bf16", "prefix_bf16", "llama_adapter_bf16",
    "qlora_int8", "qlora_nf4", "qlora_nf4_dq", "qlora_fp4", "qdora_nf4", "loftq_nf4", "prefix_nf4", "llama_adapter_nf4",
    "rtn", "gptq", "qlora_gptq", "qalora",
)  # fmt: skip
DATA_TYPE_LABELS = {
    "bfloat16": "BFloat16",
    "float16": "Float16",
    "fp4": "Float4",
    "nf4": "NFloat4",
    "nf4+dq": "NFloat4 + DQ",
}
CATEGORY_LABELS = {
    "humanities": "Hums.",
    "stem": "STEM",
    "social_sciences": "Social",
    "other": "Other",
    "overall": "Avg.",
}
# What a row of the main table shows to say which configuration it is. Runs are grouped by
# their whole settings (analysis.load's ``settings``); these only label the groups.
LABEL_COLUMNS = ["model", "data", "method", "quant_format"]
# Families whose runs never train (methods.base.FAMILIES): rows "without fine-tuning".
POST_TRAINING_FAMILIES = ("base", "bnb", "rtn", "gptq")
# Settings that tables spread over columns instead of rows: the 0-shot and 5-shot runs of
# one configuration share a row (and held-out perplexity does not depend on the shots).
SPREAD_SETTINGS = ("eval.num_fewshot",)
MIXED = "‡"
MIXED_NOTE = (
    f"{MIXED} the runs of this cell come from more than one code version (git commit, or "
    "uncommitted changes) or device: the spread is not the seeds' alone."
)


# ----------------------------------------------------------------------------- cells


def _fmt_stat(values: pd.Series, digits: int | str, with_n: bool = False) -> str:
    spec = digits if isinstance(digits, str) else f".{digits}f"  # a str: a format spec, e.g. ".3g"
    mean = values.mean()
    text = f"{mean:{spec}}"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    if std > 0:  # equal over seeds (storage, for one): the Seeds column says how many
        text += f" ± {std:{spec}}"
    return f"{text} (n={len(values)})" if with_n else text


def cell(runs: pd.DataFrame, column: str, *, scale: float = 1.0, digits: int | str = 1, with_n: bool = False) -> str:
    """Mean ± std of ``column`` over the ok runs; else the failure statuses; else "—"."""
    ok = runs.loc[runs["status"] == Status.OK, column].dropna().astype("float64") * scale
    if len(ok):
        return _fmt_stat(ok, digits, with_n)
    failures = sorted(set(runs["status"].dropna()) - {Status.OK.value})
    return "/".join(failures) if failures else MISSING


def _runs_summary(runs: pd.DataFrame) -> str:
    counts = runs["status"].value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)


def _n_seeds(runs: pd.DataFrame) -> int:
    return int(runs.loc[runs["status"] == Status.OK, "seed"].nunique())


def _method_rank(method) -> tuple:
    name = "" if pd.isna(method) else str(method)
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


def compared_settings(settings: dict, spread: tuple[str, ...] = SPREAD_SETTINGS) -> dict:
    """A run's settings less those a table spreads over its columns."""
    return {key: value for key, value in settings.items() if key not in spread}


def _config_text(settings: dict) -> str:
    return json.dumps(compared_settings(settings), sort_keys=True, default=str)


def _groups(runs: pd.DataFrame, keys: list[str]):
    """(label tuple, runs) for each configuration, in a fixed order: method order, then labels.

    One group is the runs whose settings are equal but for the seed (and the shots): two
    groups may share their labels ``keys``; ``_distinctions`` then says what differs.
    """
    labelled = runs.assign(
        _key=[
            (tuple("" if pd.isna(v) else str(v) for v in row), _config_text(settings))
            for row, settings in zip(runs[keys].itertuples(index=False), runs["settings"])
        ]
    )
    ordered = sorted(
        labelled["_key"].unique(),
        key=lambda k: (_method_rank(k[0][keys.index("method")]) if "method" in keys else (0, ""), k),
    )
    for key in ordered:
        yield key[0], labelled[labelled["_key"] == key].drop(columns="_key")


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _distinctions(settings: list[dict], cells: list) -> list[str]:
    """For each configuration, ``key=value, ...`` over the settings that differ between two
    configurations sharing a cell (``cells[i]`` is where configuration i is shown): what a
    reader needs to tell them apart. All empty when no cell is shared."""
    by_cell = defaultdict(list)
    for one, where in zip(settings, cells):
        by_cell[where].append(one)
    keys = sorted({key for one in settings for key in one})
    differing = [
        key
        for key in keys
        if any(len({_show(one.get(key, MISSING)) for one in shared}) > 1 for shared in by_cell.values())
    ]
    return [", ".join(f"{key}={_show(one.get(key, MISSING))}" for key in differing) for one in settings]


def configuration_groups(runs: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, str, pd.DataFrame]]:
    """(labels, settings that tell it apart, runs) for each configuration, in ``_groups`` order."""
    groups = list(_groups(runs, keys))
    settings = [compared_settings(group["settings"].iloc[0]) for _, group in groups]
    distinctions = _distinctions(settings, [key for key, _ in groups])
    return [(key, distinction, group) for (key, group), distinction in zip(groups, distinctions)]


def _pivot(runs: pd.DataFrame, row_keys: list[str], column_keys: list[str]) -> dict:
    """{(row labels, settings): {column labels: runs}} for a table whose rows are ``row_keys``
    and columns ``column_keys``, one configuration per cell: configurations that would share
    a cell are rows of their own, labelled by what differs."""
    rows: dict = {}
    for key, distinction, group in configuration_groups(runs, [*row_keys, *column_keys]):
        rows.setdefault((key[: len(row_keys)], distinction), {})[key[len(row_keys) :]] = group
    return rows


def mixed_environment(runs: pd.DataFrame) -> bool:
    """Whether the ok runs (those a cell averages) come from more than one code version or device."""
    ok = runs[runs["status"] == Status.OK]
    code = ok[["git_commit", "git_dirty"]].astype("string").fillna("?").drop_duplicates()
    device = ok[["device", "device_name"]].astype("string").fillna("?").drop_duplicates()
    return len(code) > 1 or len(device) > 1


def _marked(text: str, runs: pd.DataFrame) -> str:
    return text + MIXED if mixed_environment(runs) else text


def _drop_empty_settings(table: pd.DataFrame) -> pd.DataFrame:
    """The Settings column only where some row needs it."""
    if "Settings" in table and not table["Settings"].fillna("").astype(bool).any():
        return table.drop(columns="Settings")
    return table


# ----------------------------------------------------------------------------- tables


def main_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, distinction, group in configuration_groups(runs, LABEL_COLUMNS):
        first = dict(zip(LABEL_COLUMNS, key))
        row = {
            "Model": first["model"],
            "Data": first["data"],
            "Method": first["method"],
            "Format": first["quant_format"] or MISSING,
            "Settings": distinction,
            "Weight bits/param": cell(group, "weight_bits_per_param", digits=3),
            "Weight MB": cell(group, "weight_bytes", scale=1e-6),
            "Peak train GB": cell(group, "train_peak_memory_bytes", scale=1e-9, digits=2),
            "Train tok/s": cell(group, "train_tokens_per_second", digits=0),
            "Trainable M": cell(group, "trainable_params", scale=1e-6, digits=2),
        }
        for shots in (0, 5):
            at_shots = group[group["mmlu_num_fewshot"] == shots]
            row[f"MMLU {shots}-shot %"] = cell(at_shots, "mmlu_acc", scale=100)
            for category in MMLU_CATEGORIES:
                row[f"{shots}-shot {CATEGORY_LABELS[category]}"] = cell(at_shots, f"mmlu_{category}_acc", scale=100)
        row["Perplexity"] = cell(group, "perplexity", digits=2)
        row["Seeds"] = _marked(str(_n_seeds(group)), group)
        row["Runs"] = _runs_summary(group)
        rows.append(row)
    return _drop_empty_settings(pd.DataFrame(rows))


def _config_label(group: pd.DataFrame, column: str) -> str:
    """A configuration's value of a config column (its runs differ in the seed only), or MISSING."""
    value = group[column].iloc[0]
    return MISSING if pd.isna(value) else value


def methods_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every method configuration side by side: what it stores and trains, how fast, where it ends up."""
    rows = []
    for key, distinction, group in configuration_groups(runs, LABEL_COLUMNS):
        first = dict(zip(LABEL_COLUMNS, key))
        five = group[group["mmlu_num_fewshot"] == 5]
        trained = group["train_loss_first"].notna().any()
        loss = f"{cell(group, 'train_loss_first', digits=3)} -> {cell(group, 'train_loss_last', digits=3)}"
        rows.append(
            {
                "Model": first["model"],
                "Method": first["method"],
                "Base": _config_label(group, "base"),
                "Adapter": _config_label(group, "adapter"),
                "Settings": distinction,
                "Bits/param": cell(group, "weight_bits_per_param", digits=3),
                "Weight MB": cell(group, "weight_bytes", scale=1e-6),
                "Trainable M": cell(group, "trainable_params", scale=1e-6, digits=3),
                "Train tok/s": cell(group, "train_tokens_per_second", digits=0),
                "Loss first -> last": loss if trained else MISSING,
                "Perplexity": cell(group, "perplexity", digits=2),
                "MMLU 5-shot %": cell(five, "mmlu_acc", scale=100),
                "KL vs 16-bit": cell(group, "kl_vs_base_mean", digits=KL_DIGITS),
                "Seeds": _marked(str(_n_seeds(group)), group),
            }
        )
    return _drop_empty_settings(pd.DataFrame(rows))


def load_reference(path: Path = REFERENCE_CSV) -> pd.DataFrame:
    return pd.read_csv(
        path,
        dtype={"arxiv": str, "bits": str, "num_fewshot": "Int64"},
        keep_default_na=False,
        na_values={"value": [""], "num_fewshot": [""]},
    )


def _reference_source(ref: pd.DataFrame) -> str:
    first = ref.iloc[0]
    return f"{first['paper'].split(' (')[0]} {first['table']} (arXiv {first['arxiv']})"


def _reference_cell(ref: pd.DataFrame, notes: list[str]) -> str:
    if ref.empty:
        return MISSING
    value = ref.iloc[0]
    text = f"{value['value']:g}" if value["metric"] == "perplexity" else f"{value['value']:.1f}"
    if value["note"]:
        if value["note"] not in notes:
            notes.append(value["note"])
        text += "†" * (notes.index(value["note"]) + 1)
    return text


def qlora_table4(runs: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Data type x (model, fine-tuning data), mean 5-shot MMLU; ours then the paper's."""
    adapters = runs[runs["quant_format"].isin(DATA_TYPE_LABELS) & runs["method_family"].isin(["lora", "qlora"])]
    five = adapters[adapters["mmlu_num_fewshot"] == 5]
    ref = reference[reference["table"].eq("Table 4") & reference["arxiv"].eq("2305.14314")]
    ours_cols = sorted({(m, d) for m, d in five[["model", "data"]].itertuples(index=False)})
    ref_cols = list(dict.fromkeys(ref[["model", "data"]].itertuples(index=False, name=None)))
    notes: list[str] = []
    rows = []
    pivot = _pivot(five, ["quant_format"], ["model", "data"])
    shown = [fmt for fmt in DATA_TYPE_LABELS if fmt != "float16" or (five["quant_format"] == "float16").any()]
    for fmt in shown:
        variants = sorted(
            ((settings, cells) for (key, settings), cells in pivot.items() if key == (fmt,)),
            key=lambda variant: variant[0],
        ) or [("", {})]
        for settings, cells in variants:
            row = {"Source": OURS, "Data type": DATA_TYPE_LABELS[fmt], "Settings": settings}
            for model, data in ours_cols + ref_cols:
                mine = cells.get((model, data), five.iloc[:0])
                row[f"{model} / {data}"] = _marked(cell(mine, "mmlu_acc", scale=100, with_n=True), mine)
            rows.append(row)
    for label in dict.fromkeys(ref["row"]):
        row = {"Source": _reference_source(ref), "Data type": label, "Settings": ""}
        for model, data in ours_cols + ref_cols:
            published = ref[(ref["row"] == label) & (ref["model"] == model) & (ref["data"] == data)]
            row[f"{model} / {data}"] = _reference_cell(published, notes)
        rows.append(row)
    return _drop_empty_settings(pd.DataFrame(rows)), notes


def _qalora_row_label(method: str, family: str) -> str | None:
    """Which row of the QA-LoRA table a method belongs to (None: not in that table)."""
    if method == "qlora_gptq":
        return "QLoRA w/ GPTQ"
    if family == "qalora" or method == "qalora":
        return "QA-LoRA"
    if family == "qlora":
        return "QLoRA"
    if method == "gptq":
        return "Base model w/ GPTQ"
    if family == "base" or method.startswith("base"):
        return "Base model"
    return None


QALORA_ROW_ORDER = ("Base model", "QLoRA", "Base model w/ GPTQ", "QLoRA w/ GPTQ", "QA-LoRA")
QALORA_REF_LABELS = {"base": "Base model", "qlora": "QLoRA", "qlora_gptq": "QLoRA w/ GPTQ", "qalora": "QA-LoRA"}


def _bits_label(row_label: str, bits) -> str:
    # QLoRA's inference weights are the 4-bit base plus 16-bit adapters: the paper writes 4+16.
    if row_label == "QLoRA":
        return "4+16"
    return MISSING if pd.isna(bits) else str(int(bits))


def _bits_rank(label: str) -> tuple:
    return (0, 0) if label == "4+16" else (1, -int(label)) if label.isdigit() else (2, 0)


def qalora_table1(runs: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Method x bits, MMLU 0/5-shot per category and average; ours then the paper's."""
    labels = [
        _qalora_row_label("" if pd.isna(m) else m, "" if pd.isna(f) else f)
        for m, f in runs[["method", "method_family"]].itertuples(index=False)
    ]
    mine = runs.assign(_row=labels).dropna(subset=["_row"])
    mine = mine.assign(_bits=[_bits_label(r, b) for r, b in mine[["_row", "bits"]].itertuples(index=False)])
    score_columns = [f"{s}-shot {CATEGORY_LABELS[c]}" for s in (0, 5) for c in (*MMLU_CATEGORIES, "overall")]
    rows = []
    keys = ["_row", "_bits", "model", "data", "method", "quant_format"]
    for key, settings, group in sorted(
        configuration_groups(mine, keys),
        key=lambda config: (_bits_rank(config[0][1]), QALORA_ROW_ORDER.index(config[0][0]), config[0], config[1]),
    ):
        row_label, bits, model, data, method, fmt = key
        row = {
            "Source": OURS,
            "Model": model,
            "Data": data,
            "Method": row_label,
            "Run": f"{method} ({fmt})" if fmt else method,
            "Settings": settings,
            "#Bits": bits,
            "Seeds": _marked(str(_n_seeds(group)), group),
        }
        for shots in (0, 5):
            at_shots = group[group["mmlu_num_fewshot"] == shots]
            for category in (*MMLU_CATEGORIES, "overall"):
                column = "mmlu_acc" if category == "overall" else f"mmlu_{category}_acc"
                row[f"{shots}-shot {CATEGORY_LABELS[category]}"] = cell(at_shots, column, scale=100)
        rows.append(row)
    ref = reference[reference["table"].eq("Table 1") & reference["arxiv"].eq("2309.14717")]
    notes: list[str] = []
    for (method_row, bits, model, data), published in ref.groupby(["method_row", "bits", "model", "data"], sort=False):
        row = {
            "Source": _reference_source(ref),
            "Model": model,
            "Data": data,
            "Method": QALORA_REF_LABELS[method_row],
            "Run": MISSING,
            "Settings": "",
            "#Bits": bits,
            "Seeds": MISSING,
        }
        for column in score_columns:
            shots, label = column.split("-shot ")
            category = next(c for c, lab in CATEGORY_LABELS.items() if lab == label)
            row[column] = _reference_cell(
                published[(published["num_fewshot"] == int(shots)) & (published["category"] == category)], notes
            )
        rows.append(row)
    columns = ["Source", "Model", "Data", "Method", "Run", "Settings", "#Bits", "Seeds", *score_columns]
    return _drop_empty_settings(pd.DataFrame(rows, columns=columns)), notes


def datatype_perplexity(runs: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Quantization data type x held-out perplexity on each model, without fine-tuning.

    A run counts as "without fine-tuning" when its config asked for no training steps
    (``train.max_steps=0``) or its method does not train (base, RTN, GPTQ); a LoRA run
    that failed before training does not pass for an untrained one.
    """
    post_training = runs["method_family"].isin(POST_TRAINING_FAMILIES)
    untrained = runs[runs["train_max_steps"].eq(0).fillna(False) | post_training.fillna(False)]
    models = sorted(untrained["model"].dropna().unique())
    rows = []
    for ((fmt, method), settings), cells in _pivot(untrained, ["quant_format", "method"], ["model"]).items():
        row = {
            "Source": OURS,
            "Data type": DATA_TYPE_LABELS.get(fmt, fmt or MISSING),
            "Run": method,
            "Settings": settings,
        }
        for model in models:
            mine = cells.get((model,), untrained.iloc[:0])
            row[f"{model} (held-out)"] = _marked(cell(mine, "perplexity", digits=2, with_n=True), mine)
        rows.append(row)
    if not rows:
        rows.append({"Source": OURS, "Data type": MISSING, "Run": "no run without fine-tuning", "Settings": ""})
    ref = reference[reference["table"].eq("Table 2") & reference["arxiv"].eq("2305.14314")]
    notes: list[str] = []
    for _, published in ref.iterrows():
        column = f"{published['model']}, {published['category']}"
        rows.append(
            {
                "Source": _reference_source(ref),
                "Data type": published["row"],
                "Run": MISSING,
                "Settings": "",
                column: _reference_cell(published.to_frame().T, notes),
            }
        )
    return _drop_empty_settings(pd.DataFrame(rows).fillna(MISSING)), notes


def storage_label(family, quant_format, bits, group_size) -> str:
    """How the fidelity tables name a storage format: "NFloat4", "INT3 RTN g32", "INT4 GPTQ g32"."""
    if family in ("rtn", "gptq", "qalora", "qlora_gptq") and not pd.isna(bits) and not pd.isna(group_size):
        kind = {"rtn": "RTN", "gptq": "GPTQ", "qalora": "QA-LoRA", "qlora_gptq": "GPTQ"}[family]
        return f"INT{int(bits)} {kind} g{int(group_size)}"
    return DATA_TYPE_LABELS.get(quant_format, quant_format if isinstance(quant_format, str) else MISSING)


def export_label(export: str) -> str:
    return f"GGUF {export.removeprefix('gguf_').upper()}" if export.startswith("gguf_") else export


KL_DIGITS = ".3g"  # KL divergence spans 1e-5 (8-bit) to nats (2-bit): significant digits, not decimals


def _as_export_runs(exports: pd.DataFrame) -> pd.DataFrame:
    """Export rows with the export's own status where ``cell`` reads a run's."""
    return exports.assign(status=exports["export_status"])


def _fidelity_figures(group: pd.DataFrame, bits: str, kl: str, agreement: str, ppl: str) -> dict:
    """The data-type table's figures; ``kl`` names the KL columns with a ``{}`` for mean, median, p99, max."""
    return {
        "Bits/param": cell(group, bits, digits=3),
        "KL mean": cell(group, kl.format("mean"), digits=KL_DIGITS),
        "KL median": cell(group, kl.format("median"), digits=KL_DIGITS),
        "KL p99": cell(group, kl.format("p99"), digits=KL_DIGITS),
        "KL max": cell(group, kl.format("max"), digits=KL_DIGITS),
        "Top-token agreement %": cell(group, agreement, scale=100, digits=2),
        "Perplexity": cell(group, ppl, digits=2),
        "Seeds": _marked(str(_n_seeds(group)), group),
    }


def _untrained(runs: pd.DataFrame) -> pd.DataFrame:
    post_training = runs["method_family"].isin(POST_TRAINING_FAMILIES).fillna(False)
    return runs[runs["train_max_steps"].eq(0).fillna(False) | post_training]


def datatype_fidelity(runs: pd.DataFrame) -> pd.DataFrame:
    """Storage formats of the base without fine-tuning against the 16-bit base, most bits first.

    Rows: every untrained run that measured its fidelity (its method's format), and every
    export of an untrained 16-bit base run (the GGUF rows).
    """
    untrained = _untrained(runs)
    measured = untrained[untrained["kl_vs_base_mean"].notna() | untrained["status"].ne(Status.OK)]
    rows = []
    for (model, method, fmt), settings, group in configuration_groups(measured, ["model", "method", "quant_format"]):
        first = group.iloc[0]
        rows.append(
            {
                "Model": model,
                "Format": storage_label(first["method_family"], fmt, first["bits"], first["group_size"]),
                "Run": method,
                "Settings": settings,
                **_fidelity_figures(
                    group, "weight_bits_per_param", "kl_vs_base_{}", "top_token_agreement_vs_base", "perplexity"
                ),
                "_bits": group["weight_bits_per_param"].mean(),
                "_kl": group["kl_vs_base_mean"].mean(),
            }
        )
    exports = load_exports(untrained[untrained["method_family"].eq("base").fillna(False)])
    exports = _as_export_runs(exports)
    for (model, method, export), settings, group in configuration_groups(exports, ["model", "method", "export"]):
        rows.append(
            {
                "Model": model,
                "Format": export_label(export),
                "Run": f"{method} → {export}",
                "Settings": settings,
                **_fidelity_figures(
                    group,
                    "export_weight_bits_per_param",
                    "export_kl_{}_vs_base",
                    "export_top_token_agreement_vs_base",
                    "export_perplexity",
                ),
                "_bits": group["export_weight_bits_per_param"].mean(),
                "_kl": group["export_kl_mean_vs_base"].mean(),
            }
        )
    if not rows:
        return pd.DataFrame([{"Model": MISSING, "Format": MISSING, "Run": "no run measured its fidelity"}])
    table = pd.DataFrame(rows).sort_values(["Model", "_bits", "_kl"], ascending=[True, False, True], kind="mergesort")
    return _drop_empty_settings(table.drop(columns=["_bits", "_kl"]).reset_index(drop=True))


def fidelity_points(runs: pd.DataFrame) -> pd.DataFrame:
    """The data-type table's points, one per ok run or export: model, format label, bits/param,
    mean KL divergence against the 16-bit base (for plots)."""
    untrained = _untrained(runs)
    own = untrained[untrained["status"].eq(Status.OK) & untrained["kl_vs_base_mean"].notna()]
    points = [
        (row.model, storage_label(row.method_family, row.quant_format, row.bits, row.group_size),
         row.weight_bits_per_param, row.kl_vs_base_mean)
        for row in own.itertuples()
    ]  # fmt: skip
    exports = load_exports(untrained[untrained["method_family"].eq("base").fillna(False)])
    exports = exports[exports["export_status"].eq(Status.OK.value)]
    points += [
        (row.model, export_label(row.export), row.export_weight_bits_per_param, row.export_kl_mean_vs_base)
        for row in exports.itertuples()
    ]
    return pd.DataFrame(points, columns=["model", "format", "bits_per_param", "kl_mean"])


def deploy_fidelity(runs: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuned runs with exports: the run as trained, then each export of it."""
    exported = runs[
        runs["exports"].map(lambda e: isinstance(e, dict) and bool(e)) & ~runs.index.isin(_untrained(runs).index)
    ]
    exports = _as_export_runs(load_exports(exported))
    rows = []
    for (model, method, fmt), settings, group in configuration_groups(exported, ["model", "method", "quant_format"]):
        first = group.iloc[0]
        label = storage_label(first["method_family"], fmt, first["bits"], first["group_size"])
        rows.append(
            {
                "Model": model,
                "Method": method,
                "Format": f"as trained ({label})",
                "Settings": settings,
                "Bits/param": cell(group, "weight_bits_per_param", digits=3),
                "Size MB": cell(group, "weight_bytes", scale=1e-6),
                "Perplexity": cell(group, "perplexity", digits=2),
                "KL vs trained": MISSING,
                "Top-token agreement vs trained %": MISSING,
                "KL vs 16-bit base": cell(group, "kl_vs_base_mean", digits=KL_DIGITS),
                "MMLU %": cell(group, "mmlu_acc", scale=100),
                "Seeds": _marked(str(_n_seeds(group)), group),
            }
        )
        mine = exports[exports["config_id"].isin(group["config_id"])]
        for export in dict.fromkeys(mine["export"]):
            runs_of = mine[mine["export"] == export]
            rows.append(
                {
                    "Model": model,
                    "Method": method,
                    "Format": export_label(export),
                    "Settings": settings,
                    "Bits/param": cell(runs_of, "export_weight_bits_per_param", digits=3),
                    "Size MB": cell(runs_of, "export_bytes", scale=1e-6),
                    "Perplexity": cell(runs_of, "export_perplexity", digits=2),
                    "KL vs trained": cell(runs_of, "export_kl_mean_vs_trained", digits=KL_DIGITS),
                    "Top-token agreement vs trained %": cell(
                        runs_of, "export_top_token_agreement_vs_trained", scale=100, digits=2
                    ),
                    "KL vs 16-bit base": cell(runs_of, "export_kl_mean_vs_base", digits=KL_DIGITS),
                    "MMLU %": cell(runs_of, "export_mmlu_acc", scale=100),
                    "Seeds": _marked(str(_n_seeds(runs_of)), runs_of),
                }
            )
    if not rows:
        return pd.DataFrame([{"Model": MISSING, "Method": "no fine-tuned run with exports"}])
    return _drop_empty_settings(pd.DataFrame(rows))


def gguf_readers(runs: pd.DataFrame) -> pd.DataFrame:
    """Each GGUF export as transformers' reader scores it (dequantized, PyTorch in float32) and as
    llama.cpp runs it, against the 16-bit base: what the runtime itself adds."""
    exports = load_exports(runs)
    scored = _as_export_runs(exports[exports["export_llama_cpp_perplexity"].notna()])
    rows = []
    for (model, method, export), settings, group in configuration_groups(scored, ["model", "method", "export"]):
        rows.append(
            {
                "Model": model,
                "Run": f"{method} → {export}",
                "Settings": settings,
                "Bits/param": cell(group, "export_weight_bits_per_param", digits=3),
                "KL transformers": cell(group, "export_kl_mean_vs_base", digits=KL_DIGITS),
                "KL llama.cpp": cell(group, "export_llama_cpp_kl_mean_vs_base", digits=KL_DIGITS),
                "Top-token % transformers": cell(group, "export_top_token_agreement_vs_base", scale=100, digits=2),
                "Top-token % llama.cpp": cell(
                    group, "export_llama_cpp_top_token_agreement_vs_base", scale=100, digits=2
                ),
                "Perplexity transformers": cell(group, "export_perplexity", digits=3),
                "Perplexity llama.cpp": cell(group, "export_llama_cpp_perplexity", digits=3),
            }
        )
    if not rows:
        return pd.DataFrame([{"Model": MISSING, "Run": "no GGUF export scored by llama.cpp"}])
    return _drop_empty_settings(pd.DataFrame(rows))


# ----------------------------------------------------------------------------- writers


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "—": "---",
    "†": r"$^\dagger$",
    MIXED: r"$^\ddagger$",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\caption{" + _latex_escape(caption) + "}",
        r"\label{tab:" + label + "}",
        r"\begin{tabular}{" + "l" * table.shape[1] + "}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


CAPTIONS = {
    "methods": "Every method as a base format x an adapter: bits per parameter of the block linears (quantization "
    "constants included), weights in MB (10^6 bytes), trained parameters in millions, training throughput, "
    "training loss at the first and last step, held-out perplexity, 5-shot MMLU accuracy (%), mean KL divergence "
    "(nats) of next-token distributions against the 16-bit base.",
    "main": "Method comparison: mean ± std over seeds (Seeds: number of seeds with an ok run). "
    "MB = 10^6 bytes, GB = 10^9 bytes; MMLU accuracy in %.",
    "qlora_table4": "Mean 5-shot MMLU accuracy (%) by data type, model and fine-tuning data, "
    "in the layout of the QLoRA paper's Table 4.",
    "qalora_table1": "MMLU 0-shot and 5-shot accuracy (%) by method and bit width, "
    "in the layout of the QA-LoRA paper's Table 1.",
    "datatype_fidelity": "Storage formats of the base without fine-tuning against the 16-bit base (bf16 "
    "weights computing in fp32): bits per parameter of the block linears (quantization constants included), "
    "KL divergence KL(base || format) of next-token distributions over the full vocabulary in nats, share of "
    "positions whose most likely next token agrees, held-out perplexity.",
    "deploy_fidelity": "Each fine-tuned method exported to deploy formats: bits per parameter of the block "
    "linears, size on disk (the run as trained: in memory), perplexity, mean KL divergence in nats against the "
    "fine-tuned model before export and against the 16-bit base, top-token agreement, MMLU (%).",
    "gguf_readers": "GGUF exports scored two ways against the 16-bit base: read back by transformers "
    "(dequantized, float32 compute) and run by llama.cpp (llama-cpp-python): mean KL divergence in nats, "
    "top-token agreement, perplexity.",
    "datatype_perplexity": "Held-out perplexity by quantization data type without fine-tuning, "
    "in the spirit of the QLoRA paper's Table 2 (the published numbers are "
    "Pile Common Crawl means over many models, not our text).",
}
LEGEND = (
    "— : no run (ours) or no verified published value; oom/failed: every run of the cell "
    "ended so; n: number of seeds; Settings (where shown): what tells apart configurations "
    "that the other labels do not."
)


def build_tables(runs: pd.DataFrame, reference: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, list[str]]]:
    return {
        "main": (main_table(runs), []),
        "qlora_table4": qlora_table4(runs, reference),
        "qalora_table1": qalora_table1(runs, reference),
        "datatype_perplexity": datatype_perplexity(runs, reference),
        "datatype_fidelity": (datatype_fidelity(runs), []),
        "deploy_fidelity": (deploy_fidelity(runs), []),
        "gguf_readers": (gguf_readers(runs), []),
        "methods": (methods_table(runs), []),
    }


def write_tables(
    runs: pd.DataFrame, out: Path, results_label: str, reference: pd.DataFrame | None = None
) -> list[Path]:
    """Write every table as .md, .csv and .tex under ``out``; return the paths written."""
    reference = load_reference() if reference is None else reference
    out.mkdir(parents=True, exist_ok=True)
    written = []
    source = f"Generated by `python -m analysis.tables` from {len(runs)} run record(s) in `{results_label}`."
    for name, (table, notes) in build_tables(runs, reference).items():
        footnotes = [f"{'†' * (i + 1)} {note}" for i, note in enumerate(notes)]
        if table.astype(str).apply(lambda column: column.str.contains(MIXED, regex=False)).any(axis=None):
            footnotes.append(MIXED_NOTE)
        markdown = "\n\n".join([f"**{CAPTIONS[name]}**", to_markdown(table).rstrip("\n"), LEGEND, *footnotes, source])
        paths = {
            out / f"{name}.md": markdown + "\n",
            out / f"{name}.csv": table.to_csv(index=False, lineterminator="\n"),
            out / f"{name}.tex": to_latex(table, " ".join([CAPTIONS[name], *footnotes]), name),
        }
        for path, text in paths.items():
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="folder of run records (read recursively)")
    parser.add_argument("--out", required=True, help="folder for the .md, .csv and .tex files")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.results)
    except NoRecordsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_tables(runs, Path(args.out), args.results):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
