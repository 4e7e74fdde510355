"""Our own comparison tables: one row per method configuration (``main``), and every method as a base
format x an adapter (``methods``, the README's all-methods table)."""

from __future__ import annotations

import math

import pandas as pd

from analysis.load import MMLU_CATEGORIES
from analysis.tables.grouping import (
    LABEL_COLUMNS,
    MISSING,
    cell,
    configuration_groups,
    drop_empty_settings,
    drop_unmeasured,
    heap_kept,
    marked,
    n_seeds,
    runs_summary,
    untrained_runs,
)
from analysis.tables.labels import CATEGORY_LABELS, KL_DIGITS
from experiments.harness.record import Status


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
            "Peak train GB": upper_bound_where_heap_kept(
                group, cell(group, "train_peak_memory_bytes", scale=1e-9, digits=2)
            ),
            "Train tok/s": cell(group, "train_tokens_per_second", digits=0),
            "Trainable M": cell(group, "trainable_params", scale=1e-6, digits=2),
        }
        for shots in (0, 5):
            at_shots = group[group["mmlu_num_fewshot"] == shots]
            row[f"MMLU {shots}-shot %"] = cell(at_shots, "mmlu_acc", scale=100)
            for category in MMLU_CATEGORIES:
                row[f"{shots}-shot {CATEGORY_LABELS[category]}"] = cell(at_shots, f"mmlu_{category}_acc", scale=100)
        row["Perplexity"] = cell(group, "perplexity", digits=2)
        row["Seeds"] = marked(str(n_seeds(group)), group)
        row["Runs"] = runs_summary(group)
        rows.append(row)
    return drop_empty_settings(pd.DataFrame(rows))


def upper_bound_where_heap_kept(runs: pd.DataFrame, text: str) -> str:
    """``text`` marked "≤" where a run's CPU peak is an upper bound (``heap_kept``)."""
    return f"≤{text}" if heap_kept(runs) and text != MISSING else text


def _config_label(group: pd.DataFrame, column: str) -> str:
    """A configuration's value of a config column (its runs differ in the seed only), or MISSING."""
    value = group[column].iloc[0]
    return MISSING if pd.isna(value) else value


SIXTEEN_BIT = ("bfloat16", "float16")


def _untrained_perplexity(untrained: pd.DataFrame, like: pd.Series, stored_as) -> float:
    """Mean perplexity of the ok untrained runs of ``like``'s model on ``like``'s text whose base ``stored_as``
    picks (a boolean mask over ``untrained``)."""
    same_text = [
        untrained[column].astype("string").fillna("") == ("" if pd.isna(like[column]) else str(like[column]))
        for column in ("model", "perplexity_source", "perplexity_n_tokens")
    ]
    same = untrained[(untrained["status"] == Status.OK) & same_text[0] & same_text[1] & same_text[2] & stored_as]
    return float(same["perplexity"].mean()) if len(same) else math.nan


SMALLEST_GAP = 0.01  # of the 16-bit perplexity: a smaller quantization gap has no share worth reading
NO_GAP = "gap < 1%"


def recovered(runs: pd.DataFrame, group: pd.DataFrame) -> str:
    """The share of the post-training quantization gap a fine-tuned run on a quantized base closes:
    (ppl_PTQ - ppl_method) / (ppl_PTQ - ppl_16-bit), where PTQ is the same base (quantizer and format: RTN and
    GPTQ store the same INT-k groups) without fine-tuning and 16-bit the 16-bit base without it, on the same
    text; over 100% where fine-tuning lowers the perplexity below the 16-bit base's. "—" where either run is
    missing, for a 16-bit base, and for untrained rows; "gap < 1%" where quantization cost less than 1% of the
    16-bit perplexity (the share of so small a gap is noise)."""
    untrained = untrained_runs(runs)
    ok = group[(group["status"] == Status.OK) & group["perplexity"].notna()]
    if ok.empty or ok.index.isin(untrained.index).any():
        return MISSING
    first = ok.iloc[0]
    if first["quant_format"] in SIXTEEN_BIT or pd.isna(first["base"]):
        return MISSING
    same_base = (untrained["base"] == first["base"]) & (untrained["quant_format"] == first["quant_format"])
    ptq = _untrained_perplexity(untrained, first, same_base.fillna(False))
    sixteen = _untrained_perplexity(untrained, first, untrained["quant_format"].isin(SIXTEEN_BIT).fillna(False))
    if math.isnan(ptq) or math.isnan(sixteen) or ptq <= sixteen:
        return MISSING
    if ptq - sixteen < SMALLEST_GAP * sixteen:  # LLM.int8, torchao int8: a share of next to nothing reads 900%
        return NO_GAP
    return f"{100 * (ptq - ok['perplexity'].mean()) / (ptq - sixteen):.0f}"


# Figures only some records hold (eval.forgetting; the adapter file, saved since 2026-12-05; MMLU at the
# shots a sweep ran: 5 in most, 0 in comparison_small): a table without any leaves the column out.
OPTIONAL_COLUMNS = ("Adapter file MB", "MMLU 0-shot %", "MMLU 5-shot %", "Forgetting (nats)")


def methods_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every method configuration side by side: what it stores and trains, how fast, where it ends up."""
    rows = []
    for key, distinction, group in configuration_groups(runs, LABEL_COLUMNS):
        first = dict(zip(LABEL_COLUMNS, key))
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
                "Adapter file MB": cell(group, "adapter_file_bytes", scale=1e-6, digits=2),
                "Train tok/s": cell(group, "train_tokens_per_second", digits=0),
                "Loss first -> last": loss if trained else MISSING,
                "Perplexity": cell(group, "perplexity", digits=2),
                "PTQ gap recovered %": recovered(runs, group),
                **{
                    f"MMLU {shots}-shot %": cell(group[group["mmlu_num_fewshot"] == shots], "mmlu_acc", scale=100)
                    for shots in (0, 5)
                },
                "KL vs 16-bit": cell(group, "kl_vs_base_mean", digits=KL_DIGITS),
                "Forgetting (nats)": cell(group, "forgetting", digits=4),
                "Seeds": marked(str(n_seeds(group)), group),
            }
        )
    return drop_unmeasured(drop_empty_settings(pd.DataFrame(rows)), OPTIONAL_COLUMNS)
