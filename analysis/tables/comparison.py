"""Our own comparison tables: one row per method configuration (``main``), and every method as a base
format x an adapter (``methods``, the README's all-methods table)."""

from __future__ import annotations

import pandas as pd

from analysis.load import MMLU_CATEGORIES
from analysis.tables.grouping import (
    LABEL_COLUMNS,
    MISSING,
    cell,
    configuration_groups,
    drop_empty_settings,
    marked,
    n_seeds,
    runs_summary,
)
from analysis.tables.labels import CATEGORY_LABELS, KL_DIGITS


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
        row["Seeds"] = marked(str(n_seeds(group)), group)
        row["Runs"] = runs_summary(group)
        rows.append(row)
    return drop_empty_settings(pd.DataFrame(rows))


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
                "Seeds": marked(str(n_seeds(group)), group),
            }
        )
    return drop_empty_settings(pd.DataFrame(rows))
