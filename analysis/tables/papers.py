"""The papers' tables in their own layouts, our runs beside the published numbers: the QLoRA paper's
Table 4 and (in its spirit) Table 2, the QA-LoRA paper's Table 1. Published numbers come from
``analysis/reference/published.csv``; a note on one becomes a footnote marked †."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.load import MMLU_CATEGORIES
from analysis.tables.grouping import (
    MISSING,
    cell,
    configuration_groups,
    configuration_pivot,
    drop_empty_settings,
    marked,
    n_seeds,
    untrained_runs,
)
from analysis.tables.labels import CATEGORY_LABELS, DATA_TYPE_LABELS

REFERENCE_CSV = Path(__file__).resolve().parents[1] / "reference" / "published.csv"  # analysis/reference/
OURS = "ours"


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
    pivot = configuration_pivot(five, ["quant_format"], ["model", "data"])
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
                row[f"{model} / {data}"] = marked(cell(mine, "mmlu_acc", scale=100, with_n=True), mine)
            rows.append(row)
    for label in dict.fromkeys(ref["row"]):
        row = {"Source": _reference_source(ref), "Data type": label, "Settings": ""}
        for model, data in ours_cols + ref_cols:
            published = ref[(ref["row"] == label) & (ref["model"] == model) & (ref["data"] == data)]
            row[f"{model} / {data}"] = _reference_cell(published, notes)
        rows.append(row)
    return drop_empty_settings(pd.DataFrame(rows)), notes


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
            "Seeds": marked(str(n_seeds(group)), group),
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
    return drop_empty_settings(pd.DataFrame(rows, columns=columns)), notes


def datatype_perplexity(runs: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Quantization data type x held-out perplexity on each model, without fine-tuning.

    A run counts as "without fine-tuning" when its config asked for no training steps
    (``train.max_steps=0``) or its method does not train (base, RTN, GPTQ); a LoRA run
    that failed before training does not pass for an untrained one.
    """
    untrained = untrained_runs(runs)
    models = sorted(untrained["model"].dropna().unique())
    rows = []
    by_format = configuration_pivot(untrained, ["quant_format", "method"], ["model"])
    for ((fmt, method), settings), cells in by_format.items():
        row = {
            "Source": OURS,
            "Data type": DATA_TYPE_LABELS.get(fmt, fmt or MISSING),
            "Run": method,
            "Settings": settings,
        }
        for model in models:
            mine = cells.get((model,), untrained.iloc[:0])
            row[f"{model} (held-out)"] = marked(cell(mine, "perplexity", digits=2, with_n=True), mine)
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
    return drop_empty_settings(pd.DataFrame(rows).fillna(MISSING)), notes
