"""Which runs a cell averages and what it shows: configurations that differ in nothing but the seed,
their mean ± the half-width of its 95% interval over seeds (analysis/noise.py), the runs without
fine-tuning, and the mark for a cell mixing code versions or devices."""

from __future__ import annotations

import json
from collections import defaultdict

import pandas as pd

from analysis.load import STATUSES
from analysis.noise import half_interval
from experiments.harness.record import Status

MISSING = "—"
# Display order of methods; a method not listed sorts after these, by name.
METHOD_ORDER = (
    "base_bf16", "lora_fp16", "lora_bf16", "dora_bf16", "prefix_bf16", "llama_adapter_bf16",
    "qlora_int8", "qlora_nf4", "qlora_nf4_dq", "qlora_fp4", "qdora_nf4", "loftq_nf4", "prefix_nf4", "llama_adapter_nf4",
    "rtn", "gptq", "qlora_gptq", "qalora",
)  # fmt: skip
# What a row of the main table shows to say which configuration it is. Runs are grouped by
# their whole settings (analysis.load's ``settings``); these only label the groups.
LABEL_COLUMNS = ["model", "data", "method", "quant_format"]
# Settings that tables spread over columns instead of rows: the 0-shot and 5-shot runs of
# one configuration share a row (and held-out perplexity does not depend on the shots).
SPREAD_SETTINGS = ("eval.num_fewshot",)
MIXED = "‡"
MIXED_NOTE = (
    f"{MIXED} the runs of this cell come from more than one code version (git commit, or "
    "uncommitted changes) or device: the spread is not the seeds' alone."
)


def _fmt_stat(values: pd.Series, digits: int | str, with_n: bool = False) -> str:
    spec = digits if isinstance(digits, str) else f".{digits}f"  # a str: a format spec, e.g. ".3g"
    mean = values.mean()
    text = f"{mean:{spec}}"
    # one seed, or equal over seeds (storage, for one): no interval, the Seeds column says how many (the float
    # rounding of a scaled mean of equal values is no spread)
    half = half_interval(values.to_numpy()) if values.nunique() > 1 else 0.0
    if half > 0:
        text += f" ± {half:{spec}}"
    return f"{text} (n={len(values)})" if with_n else text


def cell(runs: pd.DataFrame, column: str, *, scale: float = 1.0, digits: int | str = 1, with_n: bool = False) -> str:
    """Mean ± the half-width of the 95% t-interval over seeds of ``column`` over the ok runs; else the failure
    statuses; else "—"."""
    ok = runs.loc[runs["status"] == Status.OK, column].dropna().astype("float64") * scale
    if len(ok):
        return _fmt_stat(ok, digits, with_n)
    failures = sorted(set(runs["status"].dropna()) - {Status.OK.value})
    return "/".join(failures) if failures else MISSING


def runs_summary(runs: pd.DataFrame) -> str:
    counts = runs["status"].value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)


def n_seeds(runs: pd.DataFrame) -> int:
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


def configuration_pivot(runs: pd.DataFrame, row_keys: list[str], column_keys: list[str]) -> dict:
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


def heap_kept(runs: pd.DataFrame) -> bool:
    """Whether a run measured its CPU peak with cpu_heap=fast, where freed memory the heap keeps for reuse
    counts: an upper bound (experiments/harness/measure.py, set_heap_policy)."""
    return bool(((runs["device"] == "cpu") & (runs["cpu_heap"] == "fast")).fillna(False).any())


def marked(text: str, runs: pd.DataFrame) -> str:
    return text + MIXED if mixed_environment(runs) else text


def drop_empty_settings(table: pd.DataFrame) -> pd.DataFrame:
    """The Settings column only where some row needs it."""
    if "Settings" in table and not table["Settings"].fillna("").astype(bool).any():
        return table.drop(columns="Settings")
    return table


def drop_unmeasured(table: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """``table`` without those of ``columns`` that no row measured (every cell "—")."""
    empty = [column for column in columns if column in table and table[column].eq(MISSING).all()]
    return table.drop(columns=empty)


def post_training_families() -> set[str]:
    """The families of runs that never train (rows "without fine-tuning"): each registered base format's
    family without an adapter (methods/registry.py), so a new base's untrained rows join these tables too."""
    from methods.registry import base_format, base_names

    return {base_format(base).family for base in base_names()}


def untrained_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs without fine-tuning: no training steps asked for, or a method that never trains."""
    post_training = runs["method_family"].isin(post_training_families()).fillna(False)
    return runs[runs["train_max_steps"].eq(0).fillna(False) | post_training]
