"""Each configuration against a baseline on the same units: how much of a difference the questions and text drawn
could explain.

For every configuration, the difference from the baseline configuration (``--baseline``, by method name; the
16-bit base without fine-tuning by default) of MMLU accuracy, paired over questions, and of perplexity, mean
KL divergence against the 16-bit base and the loss on general text after training (``eval.forgetting``),
paired over blocks of predicted positions (experiments/evaluation/
fidelity.py's ``position_blocks``), each with its 95% paired bootstrap interval (analysis/noise.py). A
difference whose interval covers zero is marked as within noise. Runs are paired only over the same units:
the same questions (``mmlu_questions``), the same token windows (``windows`` of the blocks). Over several
seeds, a configuration's value per unit is its seeds' mean (MMLU) or sum (perplexity, KL): the interval then
speaks of the units drawn, not of the seeds; the main table's ± speaks of the seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

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
MIN_UNITS = 2  # a single question or block: nothing to resample


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


def _show(difference: PairedDifference | None, spec: str, scale: float = 1.0) -> str:
    if difference is None:
        return MISSING
    mark = f"{WITHIN_NOISE} " if difference.within_noise else ""
    d, low, high = (scale * v for v in (difference.difference, difference.low, difference.high))
    return f"{mark}{d:+{spec}} [{low:+{spec}}, {high:+{spec}}]"


def _mmlu_difference(group: pd.DataFrame, baselines: list[pd.DataFrame], shots: int):
    """(MMLU accuracy at ``shots`` minus the baseline's, paired over questions; the number of questions)."""
    at_shots = [runs[runs["mmlu_num_fewshot"] == shots] for runs in (group, *baselines)]
    mine = at_shots[0][(at_shots[0]["status"] == Status.OK) & at_shots[0]["mmlu_questions"].notna()]
    if mine.empty:
        return None, None
    key = mine["mmlu_questions"].iloc[0]
    mine, theirs = _with_units(mine, "mmlu_questions", key), _baseline_runs(at_shots[1:], "mmlu_questions", key)
    questions = len(mine["mmlu_correct"].iloc[0])
    if theirs.empty or questions < MIN_UNITS:
        return None, None
    return paired_difference(_mean_marks(theirs), _mean_marks(mine)), questions


def _pooled_difference(group: pd.DataFrame, baselines: list[pd.DataFrame], column: str, value: str, pool):
    """(A figure pooled over blocks, ``pool(sum of value, sum of positions)``, minus the baseline's, paired over
    blocks; the number of blocks)."""
    mine = group[(group["status"] == Status.OK) & group[column].notna()]
    if mine.empty:
        return None, None
    key = _units_key(mine[column].iloc[0])
    mine, theirs = _with_units(mine, column, key), _baseline_runs(baselines, column, key)
    if theirs.empty or key[2] < MIN_UNITS:
        return None, None
    baseline_sums, sums = _summed_blocks(theirs, column, value), _summed_blocks(mine, column, value)
    return paired_pooled_difference(baseline_sums, sums, pool), key[2]


def _perplexity(total_nll, positions):
    return np.exp(total_nll / positions)


def _mean_per_position(total, positions):
    return total / positions


@dataclass
class PairedRow:
    """One configuration against the baseline: each figure's paired difference (None: not measured on the
    baseline's units), and the units paired."""

    model: str
    method: str
    settings: str
    is_baseline: bool
    mmlu: dict[int, PairedDifference | None]  # by number of shots; accuracy as a fraction
    perplexity: PairedDifference | None
    kl: PairedDifference | None
    general_loss: PairedDifference | None  # nats per position on the general text, after training
    questions: int | None
    blocks: int | None


def paired_rows(runs: pd.DataFrame, baseline: str = DEFAULT_BASELINE) -> list[PairedRow]:
    """Each configuration of a model that has a ``baseline`` run, against the first baseline configuration
    scored on its units."""
    groups = configuration_groups(runs, LABEL_COLUMNS)
    baselines: dict[str, list[pd.DataFrame]] = {}
    for key, _, group in groups:
        labels = dict(zip(LABEL_COLUMNS, key))
        if labels["method"] == baseline:
            baselines.setdefault(labels["model"], []).append(group)
    rows = []
    for key, distinction, group in groups:
        labels = dict(zip(LABEL_COLUMNS, key))
        if labels["model"] not in baselines:
            continue
        theirs = baselines[labels["model"]]
        mmlu = {shots: _mmlu_difference(group, theirs, shots) for shots in SHOTS}
        perplexity, blocks = _pooled_difference(group, theirs, "perplexity_blocks", "nll", _perplexity)
        kl, kl_blocks = _pooled_difference(group, theirs, "kl_vs_base_blocks", "kl", _mean_per_position)
        general, _ = _pooled_difference(group, theirs, "forgetting_blocks", "nll", _mean_per_position)
        rows.append(
            PairedRow(
                model=labels["model"],
                method=labels["method"],
                settings=distinction,
                is_baseline=any(group is baseline_group for baseline_group in theirs),
                mmlu={shots: difference for shots, (difference, _) in mmlu.items()},
                perplexity=perplexity,
                kl=kl,
                general_loss=general,
                questions=next((n for _, n in mmlu.values() if n), None),
                blocks=blocks or kl_blocks,
            )
        )
    return rows


def paired_table(runs: pd.DataFrame, baseline: str = DEFAULT_BASELINE) -> pd.DataFrame:
    """One row per configuration of a model that has a ``baseline`` run: its differences from the baseline's."""
    table_rows = []
    for row in paired_rows(runs, baseline):
        cells = {f"MMLU {shots}-shot Δ pp": _show(row.mmlu[shots], ".1f", 100) for shots in SHOTS}
        cells["Perplexity Δ"] = _show(row.perplexity, ".2f")
        cells["KL vs 16-bit Δ"] = _show(row.kl, KL_DIGITS)
        cells["General-text loss Δ"] = _show(row.general_loss, ".4f")
        if row.is_baseline:
            cells = {name: BASELINE if text != MISSING else text for name, text in cells.items()}
        table_rows.append(
            {
                "Model": row.model,
                "Method": row.method,
                "Settings": row.settings,
                **cells,
                "Questions": str(row.questions) if row.questions else MISSING,
                "Blocks": str(row.blocks) if row.blocks else MISSING,
            }
        )
    table = pd.DataFrame(table_rows)
    differences = [name for name in table if "Δ" in name]
    if table.empty or table[differences].isin([MISSING, BASELINE]).all(axis=None):
        return pd.DataFrame()  # records without per-unit values (written before they were): nothing to pair
    unmeasured = [name for name in differences if (table[name] == MISSING).all()]  # e.g. a shot count never run
    return drop_empty_settings(table.drop(columns=unmeasured))
