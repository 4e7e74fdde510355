"""Each configuration against a baseline on the same units: how much of a difference the questions and text drawn
could explain.

For every configuration, the difference from the baseline configuration (``--baseline``, by method name; the
16-bit base without fine-tuning by default) of MMLU accuracy, paired over questions, and of perplexity and mean
KL divergence against the 16-bit base, paired over blocks of predicted positions (experiments/evaluation/
fidelity.py's ``position_blocks``), each with its 95% paired bootstrap interval (analysis/noise.py). A
difference whose interval covers zero is marked as within noise. Runs are paired only over the same units:
the same questions (``mmlu_questions``), the same token windows (``windows`` of the blocks). Over several
seeds, a configuration's value per unit is its seeds' mean (MMLU) or sum (perplexity, KL): the interval then
speaks of the units drawn, not of the seeds; the main table's ± speaks of the seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.noise import PairedDifference, paired_difference, paired_pooled_difference
from analysis.tables.grouping import LABEL_COLUMNS, MISSING, configuration_groups, drop_empty_settings
from analysis.tables.labels import KL_DIGITS
from experiments.harness.record import Status

DEFAULT_BASELINE = "base_bf16"
WITHIN_NOISE = "≈"
BASELINE = "baseline"
SHOTS = (0, 5)


def baseline_choices(runs: pd.DataFrame) -> list[str]:
    """The methods a paired table can take as its baseline: those with an ok run."""
    return sorted(runs.loc[runs["status"] == Status.OK, "method"].dropna().unique())


def check_baseline(runs: pd.DataFrame, baseline: str) -> None:
    """A one-line error for a baseline no ok run has, naming those that do."""
    choices = baseline_choices(runs)
    if baseline not in choices:
        raise ValueError(f"baseline {baseline!r} has no ok run in these records; choose one of {choices}")


def _mean_marks(runs: pd.DataFrame) -> np.ndarray:
    """Each question's share of correct answers over the runs (their marks are strings of "0"/"1")."""
    marks = np.array([[c == "1" for c in text] for text in runs["mmlu_correct"]], dtype=float)
    return marks.mean(axis=0)


def _summed_blocks(runs: pd.DataFrame, column: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    """(``value`` summed over the runs, positions summed over the runs) per block."""
    blocks = list(runs[column])
    total = np.sum([block[value] for block in blocks], axis=0, dtype=float)
    count = np.sum([block["tokens"] for block in blocks], axis=0, dtype=float)
    return total, count


def _units_key(block) -> tuple | None:
    return (block["windows"], block["positions"], len(block["tokens"])) if isinstance(block, dict) else None


def _with_units(runs: pd.DataFrame, column: str, key) -> pd.DataFrame:
    """The ok runs whose ``column`` names units ``key`` (a questions digest, or the key of a block layout)."""
    ok = runs[(runs["status"] == Status.OK) & runs[column].notna()]
    units = ok[column] if column == "mmlu_questions" else ok[column].map(_units_key)
    return ok[[unit == key for unit in units]]


def _baseline_runs(baselines: list[pd.DataFrame], column: str, key) -> pd.DataFrame:
    """The runs of the first baseline configuration scored on units ``key``: one configuration, never a mix."""
    for group in baselines:
        theirs = _with_units(group, column, key)
        if not theirs.empty:
            return theirs
    return baselines[0].iloc[:0]


def _show(difference: PairedDifference, spec: str, scale: float = 1.0) -> str:
    mark = f"{WITHIN_NOISE} " if difference.within_noise else ""
    d, low, high = (scale * v for v in (difference.difference, difference.low, difference.high))
    return f"{mark}{d:+{spec}} [{low:+{spec}}, {high:+{spec}}]"


def _mmlu_cell(group: pd.DataFrame, baselines: list[pd.DataFrame], shots: int) -> tuple[str, int | None]:
    """MMLU accuracy at ``shots`` against the baseline's, paired over questions, and the number of questions."""
    at_shots = [runs[runs["mmlu_num_fewshot"] == shots] for runs in (group, *baselines)]
    mine = at_shots[0][(at_shots[0]["status"] == Status.OK) & at_shots[0]["mmlu_questions"].notna()]
    if mine.empty:
        return MISSING, None
    key = mine["mmlu_questions"].iloc[0]
    mine, theirs = _with_units(mine, "mmlu_questions", key), _baseline_runs(at_shots[1:], "mmlu_questions", key)
    if theirs.empty:
        return MISSING, None
    difference = paired_difference(_mean_marks(theirs), _mean_marks(mine))
    return _show(difference, ".1f", 100), len(mine["mmlu_correct"].iloc[0])


def _pooled_cell(group: pd.DataFrame, baselines: list[pd.DataFrame], column: str, value: str, pool, spec: str):
    """A figure pooled over blocks (``pool(sum of value, sum of positions)``) against the baseline's, paired over
    blocks, and the number of blocks."""
    mine = group[(group["status"] == Status.OK) & group[column].notna()]
    if mine.empty:
        return MISSING, None
    key = _units_key(mine[column].iloc[0])
    mine, theirs = _with_units(mine, column, key), _baseline_runs(baselines, column, key)
    if theirs.empty:
        return MISSING, None
    baseline_sums, sums = _summed_blocks(theirs, column, value), _summed_blocks(mine, column, value)
    return _show(paired_pooled_difference(baseline_sums, sums, pool), spec), key[2]


def paired_table(runs: pd.DataFrame, baseline: str = DEFAULT_BASELINE) -> pd.DataFrame:
    """One row per configuration of a model that has a ``baseline`` run: its differences from the baseline's."""
    groups = configuration_groups(runs, LABEL_COLUMNS)
    baselines: dict[str, list[pd.DataFrame]] = {}
    for key, _, group in groups:
        if dict(zip(LABEL_COLUMNS, key))["method"] == baseline:
            baselines.setdefault(dict(zip(LABEL_COLUMNS, key))["model"], []).append(group)
    rows = []
    for key, distinction, group in groups:
        first = dict(zip(LABEL_COLUMNS, key))
        if first["model"] not in baselines:
            continue
        model_baselines = baselines[first["model"]]
        row = {"Model": first["model"], "Method": first["method"], "Settings": distinction}
        questions = None
        for shots in SHOTS:
            row[f"MMLU {shots}-shot Δ pp"], n = _mmlu_cell(group, model_baselines, shots)
            questions = questions or n
        row["Perplexity Δ"], blocks = _pooled_cell(
            group, model_baselines, "perplexity_blocks", "nll", _perplexity, ".2f"
        )
        row["KL vs 16-bit Δ"], kl_blocks = _pooled_cell(
            group, model_baselines, "kl_vs_base_blocks", "kl", _mean_per_position, KL_DIGITS
        )
        row["Questions"] = str(questions) if questions else MISSING
        row["Blocks"] = str(blocks or kl_blocks) if (blocks or kl_blocks) else MISSING
        if any(group is theirs for theirs in model_baselines):
            row.update({name: BASELINE for name in row if "Δ" in name and row[name] != MISSING})
        rows.append(row)
    table = pd.DataFrame(rows)
    differences = [name for name in table if "Δ" in name]
    if table.empty or table[differences].isin([MISSING, BASELINE]).all(axis=None):
        return pd.DataFrame()  # records without per-unit values (written before they were): nothing to pair
    unmeasured = [name for name in differences if (table[name] == MISSING).all()]  # e.g. a shot count never run
    return drop_empty_settings(table.drop(columns=unmeasured))


def _perplexity(total_nll, positions):
    return np.exp(total_nll / positions)


def _mean_per_position(total, positions):
    return total / positions
