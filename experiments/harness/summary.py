"""The short comparison table printed after a run or a sweep, read from the records."""

from __future__ import annotations

# compute: the dtype the run computed in (compute_dtype auto takes float32 on a CPU without native bf16), so that a
# reference row from another kind of CPU says which path it ran
COLUMNS = (
    "method",
    "status",
    "compute",
    "bits/param",
    "weight MB",
    "peak MB",
    "train tok/s",
    "loss first->last",
    "MMLU acc",
)


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table_row(record: dict) -> list[str]:
    method = record.get("method") or {}
    train = record.get("train") or {}
    mmlu = (record.get("eval") or {}).get("mmlu") or {}
    peak = train.get("peak_memory_bytes")
    loss = "—"
    if train.get("loss_first") is not None:
        loss = f"{train['loss_first']:.3f} -> {train['loss_last']:.3f}"
    acc = "—"
    if mmlu.get("acc") is not None:
        acc = f"{mmlu['acc']:.3f} ({mmlu['num_fewshot']}-shot, n={mmlu['n_questions']})"
    return [
        method_name(record),
        record.get("status", "?"),
        method.get("compute_dtype") or "—",
        _fmt(method.get("weight_bits_per_param"), ".3f"),
        _fmt(method.get("weight_bytes") and method["weight_bytes"] / 1e6, ".1f"),
        _fmt(peak and peak / 1e6, ".0f"),
        _fmt(train.get("tokens_per_second"), ".0f"),
        loss,
        acc,
    ]


def method_name(record: dict) -> str:
    return (record.get("method") or {}).get("name") or record.get("config", {}).get("method", {}).get("name", "?")


def format_table(records: list[dict], reference: dict[str, dict] | None = None) -> str:
    """One row per record; with ``reference`` (run id -> record), each run's reference row under it."""
    rows = [list(COLUMNS)]
    for record in records:
        rows.append(table_row(record))
        if reference and record.get("run_id") in reference:
            rows.append(["  reference", *table_row(reference[record["run_id"]])[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
