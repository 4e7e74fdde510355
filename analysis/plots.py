"""The comparison plots, regenerated from the run records as PNG and PDF (matplotlib).

    python -m analysis.plots --results results/quickstart --out results/quickstart/plots

- ``memory_vs_accuracy``: MMLU accuracy against weight storage and against peak training
  memory, the Pareto front (no other configuration is both smaller and more accurate)
  marked.
- ``throughput``: training tokens/s per method configuration.
- ``memory_breakdown``: memory by part, stacked: frozen quantized weights, quantization
  constants, unquantized weights (embeddings, norms), adapters, optimizer state, and
  activations and the rest (peak training memory minus the tensors counted before).
- ``loss_curves``: training loss per step.
- ``fidelity_vs_bits``: KL divergence against the 16-bit base by bits per parameter for the
  storage formats without fine-tuning (``analysis.tables.fidelity.datatype_fidelity``'s points),
  Pareto front marked.
- ``paired_differences``: each configuration's difference from base_bf16 in MMLU, perplexity and KL
  divergence with its 95% paired bootstrap interval (``analysis.tables.paired``), hollow where within noise;
  written only where the records pair (they hold per-question marks and per-block sums).

Every point is the mean over the seeds of a configuration's ok runs (error bars: the 95% t-interval over
seeds, ``analysis.noise``; none for one seed); a
configuration is what ``analysis.tables.grouping`` groups (runs that differ in nothing but the seed
and the shots), labelled by method and then by whatever tells it apart from the others;
a label ending in ‡ averages runs of more than one code version or device.
Files are deterministic for the same records and matplotlib version: fixed dpi and
style, no creation date in the metadata, a fixed SVG hash salt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis.load import NoRecordsError, load_runs
from analysis.noise import half_interval
from analysis.tables.fidelity import fidelity_points
from analysis.tables.grouping import LABEL_COLUMNS, MIXED, configuration_groups, heap_kept, mixed_environment
from analysis.tables.paired import paired_rows
from experiments.harness.record import Status

DPI = 150
STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "qpeft-bench",
    "legend.fontsize": 8,
}
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None, "Producer": None}}
MEMORY_PARTS = (
    ("frozen_weight_bytes", "frozen quantized / 16-bit weights"),
    ("quantization_constant_bytes", "quantization constants"),
    ("unquantized_bytes", "unquantized weights (embeddings, norms)"),
    ("adapter_bytes", "adapters"),
    ("optimizer_state_bytes", "optimizer state"),
    ("activation_and_rest_bytes", "activations and the rest"),
)


def _half_interval(values: pd.Series) -> float:
    """The 95% interval's half-width over the seeds' values present (NaN: none present)."""
    values = values.dropna()
    return half_interval(values.to_numpy()) if len(values) else float("nan")


def configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per method configuration (ok runs only): means over seeds and the half-widths of their 95%
    intervals (``_ci``), a label, a colour."""
    ok = runs[runs["status"] == Status.OK].copy()
    weights = ok["weight_bytes"].astype("float64")
    ok["frozen_weight_bytes"] = (
        weights - ok["quantization_constant_bytes"].astype("float64") - ok["unquantized_bytes"].astype("float64")
    )
    counted = (
        weights
        + ok["adapter_bytes"].astype("float64").fillna(0)
        + ok["optimizer_state_bytes"].astype("float64").fillna(0)
    )
    ok["activation_and_rest_bytes"] = ok["train_peak_memory_bytes"].astype("float64") - counted
    numeric = [
        "mmlu_acc",
        "weight_bytes",
        "weight_bits_per_param",
        "kl_vs_base_mean",
        "train_peak_memory_bytes",
        "train_tokens_per_second",
        *(part for part, _ in MEMORY_PARTS),
    ]
    rows = []
    for key, settings, group in configuration_groups(ok, LABEL_COLUMNS):
        row = dict(zip(LABEL_COLUMNS, key), settings=settings, mixed=mixed_environment(group))
        row["heap_kept"] = heap_kept(group)
        row["n_seeds"] = group["seed"].nunique()
        for shots, at_shots in group.groupby("mmlu_num_fewshot"):
            acc = at_shots["mmlu_acc"].astype("float64").dropna() * 100
            row[f"acc{int(shots)}_mean"], row[f"acc{int(shots)}_ci"] = acc.mean(), _half_interval(acc)
        for column in numeric[1:]:
            values = group[column].astype("float64")
            row[f"{column}_mean"], row[f"{column}_ci"] = values.mean(), _half_interval(values)
        curves = [curve for curve in group["train_losses"] if isinstance(curve, list) and curve]
        row["losses"] = [list(map(float, curve)) for curve in curves]
        rows.append(row)
    configs = pd.DataFrame(rows)  # in the tables' order: method, then labels
    if configs.empty:
        return configs
    configs["label"] = [label + MIXED * mixed for label, mixed in zip(_labels(configs), configs["mixed"])]
    palette = plt.get_cmap("tab10").colors
    configs["color"] = [palette[i % len(palette)] for i in range(len(configs))]
    configs["marker"] = [("o", "s", "^", "D", "v", "P", "X", "*")[i % 8] for i in range(len(configs))]
    return configs


def _labels(configs: pd.DataFrame) -> list[str]:
    """Method name, plus only what tells configurations apart (format, model, data, settings)."""
    labels = list(configs["method"])
    for column in ("quant_format", "model", "data", "settings"):
        shared = pd.Series(labels)
        # a label shared by configurations that this column tells apart
        split = {label for label in shared[shared.duplicated()] if configs.loc[shared == label, column].nunique() > 1}
        labels = [
            f"{label} {value}" if label in split and value else label for label, value in zip(labels, configs[column])
        ]
    return labels


def _empty(ax, message: str):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both (smaller x, larger y), by x."""
    order = np.lexsort((-y, x))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def _shots(configs: pd.DataFrame) -> int | None:
    """5-shot when there is any, else 0-shot: the accuracy the plots show."""
    for shots in (5, 0):
        if f"acc{shots}_mean" in configs and configs[f"acc{shots}_mean"].notna().any():
            return shots
    return None


def plot_memory_vs_accuracy(configs: pd.DataFrame):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, layout="constrained")
    shots = None if configs.empty else _shots(configs)
    panels = (
        ("weight_bytes", 1e-6, "Weight storage (MB, all quantization constants included)"),
        ("train_peak_memory_bytes", 1e-9, "Peak training memory (GB)" + _heap_kept_note(configs)),
    )
    for ax, (column, scale, xlabel) in zip(axes, panels):
        ax.set_xlabel(xlabel)
        if shots is None:
            _empty(ax, "no run with an MMLU accuracy")
            continue
        data = configs.dropna(subset=[f"acc{shots}_mean", f"{column}_mean"])
        if data.empty:
            _empty(ax, "no run with both figures")
            continue
        x = data[f"{column}_mean"].to_numpy() * scale
        y = data[f"acc{shots}_mean"].to_numpy()
        for i, row in enumerate(data.itertuples()):
            ax.errorbar(
                x[i],
                y[i],
                yerr=np.nan_to_num(getattr(row, f"acc{shots}_ci")),
                xerr=np.nan_to_num(getattr(row, f"{column}_ci")) * scale,
                fmt=row.marker,
                color=row.color,
                markersize=8,
                capsize=3,
                label=row.label,
            )
        front = pareto_front(x, y)
        ax.step(x[front], y[front], where="post", color="0.2", linestyle="--", linewidth=1, label="Pareto front")
        ax.scatter(x[front], y[front], s=220, facecolors="none", edgecolors="0.2", linewidths=1.2)
        ax.margins(x=0.15, y=0.15)
    axes[0].set_ylabel(f"MMLU accuracy, {shots}-shot (%)" if shots is not None else "MMLU accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="method (mean, 95% interval over seeds)")
    fig.suptitle("Memory vs accuracy (circled: Pareto front, lower memory and higher accuracy)")
    return fig


def plot_throughput(configs: pd.DataFrame):
    height = 1.2 + 0.45 * max(len(configs), 1)
    fig, ax = plt.subplots(figsize=(7, height), layout="constrained")
    data = configs.dropna(subset=["train_tokens_per_second_mean"]) if not configs.empty else configs
    if data.empty:
        _empty(ax, "no run with a training throughput")
    else:
        positions = np.arange(len(data))[::-1]  # first configuration on top
        values = data["train_tokens_per_second_mean"].to_numpy()
        ax.barh(
            positions,
            values,
            xerr=np.nan_to_num(data["train_tokens_per_second_ci"].to_numpy()),
            color=list(data["color"]),
            capsize=3,
        )
        ax.set_yticks(positions, list(data["label"]))
        for position, value in zip(positions, values):
            ax.text(value, position, f"  {value:.0f}", va="center", ha="left")
        ax.set_xlim(0, values.max() * 1.18)
        ax.grid(axis="y", visible=False)
    ax.set_xlabel("Training throughput (tokens/s, non-padding tokens, after warm-up)")
    ax.set_title("Training throughput per method")
    return fig


def _heap_kept_note(configs: pd.DataFrame) -> str:
    """Said under a peak-memory axis where some run measured it with cpu_heap=fast (an upper bound)."""
    kept = not configs.empty and configs["heap_kept"].any()
    return "\n(cpu_heap=fast: upper bounds)" if kept else ""


def plot_memory_breakdown(configs: pd.DataFrame):
    height = 1.8 + 0.45 * max(len(configs), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True, layout="constrained")
    data = configs.dropna(subset=["weight_bytes_mean"]) if not configs.empty else configs
    if data.empty:
        for ax in axes:
            _empty(ax, "no run with memory figures")
        return fig
    positions = np.arange(len(data))[::-1]
    colors = plt.get_cmap("Set2").colors
    panels = (
        (axes[0], MEMORY_PARTS[:-1], 1e-6, "Model state, exact tensor bytes (MB)"),
        (axes[1], MEMORY_PARTS, 1e-9, "Peak training memory by part (GB)" + _heap_kept_note(data)),
    )
    for ax, parts, scale, xlabel in panels:
        left = np.zeros(len(data))
        for (column, label), color in zip(parts, colors):
            values = np.nan_to_num(data[f"{column}_mean"].to_numpy()) * scale
            ax.barh(positions, values, left=left, color=color, label=label, edgecolor="white", linewidth=0.5)
            left += values
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(positions, list(data["label"]))
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3)
    fig.suptitle("Memory by part (activations and the rest = peak training memory minus the tensors)")
    return fig


def plot_loss_curves(configs: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(8.5, 4.2), layout="constrained")
    drawn = False
    for row in configs.itertuples() if not configs.empty else []:
        if not row.losses:
            continue
        steps = min(len(curve) for curve in row.losses)
        curves = np.array([curve[:steps] for curve in row.losses])
        x = np.arange(1, steps + 1)
        mean = curves.mean(axis=0)
        ax.plot(
            x,
            mean,
            color=row.color,
            marker=row.marker,
            markersize=3,
            linewidth=1.3,
            label=f"{row.label} (n={len(curves)})",
        )
        if len(curves) > 1:
            half = np.array([half_interval(step) for step in curves.T])
            ax.fill_between(x, mean - half, mean + half, color=row.color, alpha=0.15, linewidth=0)
        drawn = True
    if not drawn:
        _empty(ax, "no run with a training loss")
    else:
        # outside the axes: a legend inside would sit on the curves of some runs
        fig.legend(loc="outside right upper", title="method (seeds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel("Training loss (cross-entropy, nats/token)")
    ax.set_title("Training loss per step (mean over seeds, band: 95% interval)")
    return fig


def plot_fidelity_vs_bits(runs: pd.DataFrame):
    """Mean KL divergence against the 16-bit base by bits per parameter, without fine-tuning:
    the data-type table's points, the Pareto front (no other format is both smaller and closer)."""
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    ax.set_xlabel("Bits per parameter of the block linears (quantization constants included)")
    ax.set_ylabel("KL divergence to the 16-bit base (nats, log scale)")
    points = fidelity_points(runs).groupby(["model", "format"], as_index=False)[["bits_per_param", "kl_mean"]].mean()
    points = points[points["kl_mean"] > 0]  # the log scale has no 0; the 16-bit base against itself is not a point
    if points.empty:
        _empty(ax, "no run measured its KL divergence")
        return fig
    for model, of_model in points.groupby("model"):
        x, y = of_model["bits_per_param"].to_numpy(), of_model["kl_mean"].to_numpy()
        ax.scatter(x, y, s=36, label=model, zorder=3)
        for xi, yi, name in zip(x, y, of_model["format"]):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, 3), fontsize=7)
        front = pareto_front(x, -y)
        ax.step(x[front], y[front], where="post", color="0.2", linestyle="--", linewidth=1)
        ax.scatter(x[front], y[front], s=140, facecolors="none", edgecolors="0.2", linewidths=1.1)
    ax.set_yscale("log")
    ax.legend(title="model", loc="upper right")
    ax.set_title("Fidelity vs size without fine-tuning (circled: Pareto front, fewer bits and lower KL)")
    return fig


def plot_kl_vs_bits(configs: pd.DataFrame):
    """Every configuration, fine-tuned or not: mean KL divergence against the 16-bit base (95% interval over
    seeds) by bits per parameter, with the Pareto front (no other configuration is both smaller and closer).
    None when no configuration measured its KL divergence."""
    if configs.empty or "kl_vs_base_mean_mean" not in configs:
        return None
    data = configs.dropna(subset=["kl_vs_base_mean_mean", "weight_bits_per_param_mean"])
    data = data[data["kl_vs_base_mean_mean"] > 0]  # the log scale has no 0: the 16-bit base against itself
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    x, y = data["weight_bits_per_param_mean"].to_numpy(), data["kl_vs_base_mean_mean"].to_numpy()
    for i, row in enumerate(data.itertuples()):
        error = np.nan_to_num(row.kl_vs_base_mean_ci)
        ax.errorbar(
            x[i], y[i], yerr=[[min(error, 0.999 * y[i])], [error]], fmt=row.marker, color=row.color,
            markersize=7, capsize=3, label=row.label,
        )  # fmt: skip
    front = pareto_front(x, -y)
    ax.step(x[front], y[front], where="post", color="0.2", linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter(x[front], y[front], s=180, facecolors="none", edgecolors="0.2", linewidths=1.1)
    ax.set_yscale("log")
    ax.set_xlabel("Bits per parameter of the block linears (quantization constants included)")
    ax.set_ylabel("KL divergence to the 16-bit base (nats, log scale)")
    ax.margins(x=0.1)
    fig.legend(loc="outside right center", title="method (mean, 95% interval over seeds)")
    ax.set_title("KL vs bits, fine-tuned and not (circled: Pareto front, fewer bits and lower KL)")
    return fig


def plot_paired_differences(runs: pd.DataFrame):
    """Each configuration's difference from the baseline (``analysis.tables.paired``, base_bf16) with its 95%
    paired bootstrap interval: MMLU (percentage points, over questions; 5-shot where any run has it, else
    0-shot), perplexity and mean KL divergence (over blocks of positions). Hollow markers: within noise (the
    interval covers zero)."""
    rows = [row for row in paired_rows(runs) if not row.is_baseline]
    if not any(any(row.mmlu.values()) or row.perplexity or row.kl for row in rows):
        return None  # records without per-unit values, or without a baseline run: nothing to draw
    shots = 5 if any(row.mmlu[5] for row in rows) else 0
    panels = (
        (f"MMLU {shots}-shot (points)", lambda row: row.mmlu[shots], 100),
        ("Perplexity", lambda row: row.perplexity, 1),
        ("Mean KL vs 16-bit (nats)", lambda row: row.kl, 1),
    )
    height = 1.6 + 0.32 * max(len(rows), 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(11, height), sharey=True, layout="constrained")
    positions = np.arange(len(rows))[::-1]  # first configuration on top
    labels = [f"{row.method} ({row.settings})" if row.settings else row.method for row in rows]
    for ax, (title, difference_of, scale) in zip(axes, panels):
        drawn = False
        for position, row in zip(positions, rows):
            difference = difference_of(row)
            if difference is None:
                continue
            d, low, high = (scale * v for v in (difference.difference, difference.low, difference.high))
            ax.errorbar(
                d, position, xerr=[[d - low], [high - d]], fmt="o", color="C0", capsize=3,
                markerfacecolor="white" if difference.within_noise else "C0",
            )  # fmt: skip
            drawn = True
        ax.axvline(0.0, color="0.3", linewidth=1)
        ax.set_xlabel(f"{title}: difference from base_bf16")
        ax.grid(axis="y", visible=False)
        if not drawn:
            _empty(ax, "no run paired with the baseline")
    axes[0].set_yticks(positions, labels)
    fig.suptitle("Against the 16-bit base without fine-tuning: 95% paired bootstrap intervals (hollow: within noise)")
    return fig


# Plots of the runs themselves (not of configurations): they read fields configurations() does not carry.
RUN_PLOTS = {"fidelity_vs_bits": plot_fidelity_vs_bits, "paired_differences": plot_paired_differences}

PLOTS = {
    "memory_vs_accuracy": plot_memory_vs_accuracy,
    "throughput": plot_throughput,
    "memory_breakdown": plot_memory_breakdown,
    "loss_curves": plot_loss_curves,
    "kl_vs_bits": plot_kl_vs_bits,  # None without KL divergences: not drawn
}


def save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        fig.savefig(path, format=ext, dpi=DPI, metadata=METADATA[ext])
        paths.append(path)
    plt.close(fig)
    return paths


def write_plots(runs: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context(STYLE):
        configs = configurations(runs)
        drawn = [(name, lambda plot=plot: plot(configs)) for name, plot in PLOTS.items()]
        drawn += [(name, lambda plot=plot: plot(runs)) for name, plot in RUN_PLOTS.items()]
        for name, draw in drawn:  # one figure open at a time: each is saved and closed before the next
            fig = draw()
            if fig is not None:  # a plot with nothing to draw returns None
                written += save(fig, out, name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="folder of run records (read recursively)")
    parser.add_argument("--out", required=True, help="folder for the .png and .pdf files")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")  # files only, no display; a notebook keeps its own inline backend
    try:
        runs = load_runs(args.results)
    except NoRecordsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_plots(runs, Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
