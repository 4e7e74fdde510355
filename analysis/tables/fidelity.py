"""How far a storage format or an export moves the model's predictions: the data-type table (the base
without fine-tuning against the 16-bit base), the deploy table (each export of a fine-tuned run), the
GGUF readers (transformers against llama.cpp), and the data-type table's points for plots."""

from __future__ import annotations

import pandas as pd

from analysis.load import load_exports
from analysis.tables.grouping import (
    MISSING,
    cell,
    configuration_groups,
    drop_empty_settings,
    marked,
    n_seeds,
    untrained_runs,
)
from analysis.tables.labels import KL_DIGITS, export_label, storage_label
from experiments.harness.record import Status


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
        "Seeds": marked(str(n_seeds(group)), group),
    }


def datatype_fidelity(runs: pd.DataFrame) -> pd.DataFrame:
    """Storage formats of the base without fine-tuning against the 16-bit base, most bits first.

    Rows: every untrained run that measured its fidelity (its method's format), and every
    export of an untrained 16-bit base run (the GGUF rows).
    """
    untrained = untrained_runs(runs)
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
    return drop_empty_settings(table.drop(columns=["_bits", "_kl"]).reset_index(drop=True))


def fidelity_points(runs: pd.DataFrame) -> pd.DataFrame:
    """The data-type table's points, one per ok run or export: model, format label, bits/param,
    mean KL divergence against the 16-bit base (for plots)."""
    untrained = untrained_runs(runs)
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
        runs["exports"].map(lambda e: isinstance(e, dict) and bool(e)) & ~runs.index.isin(untrained_runs(runs).index)
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
                "Seeds": marked(str(n_seeds(group)), group),
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
                    "Seeds": marked(str(n_seeds(runs_of)), runs_of),
                }
            )
    if not rows:
        return pd.DataFrame([{"Model": MISSING, "Method": "no fine-tuned run with exports"}])
    return drop_empty_settings(pd.DataFrame(rows))


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
    return drop_empty_settings(pd.DataFrame(rows))
