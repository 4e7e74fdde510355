"""Every table built from the records and written as .md, .csv and .tex files, and the command line
that does it (``python -m analysis.tables``: analysis/tables/__main__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.load import NoRecordsError, load_runs
from analysis.tables.comparison import main_table, methods_table
from analysis.tables.fidelity import datatype_fidelity, deploy_fidelity, gguf_readers
from analysis.tables.grouping import MIXED, MIXED_NOTE
from analysis.tables.paired import DEFAULT_BASELINE, WITHIN_NOISE, check_baseline, paired_table
from analysis.tables.papers import datatype_perplexity, load_reference, qalora_table1, qlora_table4
from analysis.tables.writers import to_latex, to_markdown

DESCRIPTION = "The comparison tables, regenerated from the run records as Markdown, CSV and LaTeX."
CAPTIONS = {
    "methods": "Every method as a base format x an adapter: bits per parameter of the block linears (quantization "
    "constants included), weights in MB (10^6 bytes), trained parameters in millions, training throughput, "
    "training loss at the first and last step, held-out perplexity, the share (%) of the post-training "
    "quantization gap in perplexity a fine-tuned run on a quantized base closes ((PTQ - run) / (PTQ - 16-bit), "
    "both without fine-tuning, where both ran; 'gap < 1%' where the base loses less than 1% of the 16-bit "
    "perplexity), MMLU accuracy (%) at the shots its column names, mean KL divergence (nats) of "
    "next-token distributions against the 16-bit base.",
    "main": "Method comparison: mean ± the half-width of its 95% t-interval over seeds (Seeds: number of seeds "
    "with an ok run; one seed: no interval). "
    "MB = 10^6 bytes, GB = 10^9 bytes; MMLU accuracy in %. ≤: a CPU peak measured with cpu_heap=fast, where "
    "freed memory the heap keeps for reuse counts (an upper bound).",
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
    "paired": "Each configuration against the baseline configuration ({baseline}) on the same units: the "
    "difference (configuration - baseline) and its 95% paired bootstrap interval, over questions for MMLU "
    "accuracy (percentage points) and over blocks of 128 predicted positions for perplexity and mean KL "
    f"divergence against the 16-bit base (nats). {WITHIN_NOISE}: the interval covers zero, the difference is "
    "within noise. Questions, Blocks: the units paired. Over several seeds a unit's value is their mean (MMLU) "
    "or sum (perplexity, KL).",
    "datatype_perplexity": "Held-out perplexity by quantization data type without fine-tuning, "
    "in the spirit of the QLoRA paper's Table 2 (the published numbers are "
    "Pile Common Crawl means over many models, not our text).",
}
LEGEND = (
    "— : no run (ours) or no verified published value; oom/failed: every run of the cell "
    "ended so; n: number of seeds; Settings (where shown): what tells apart configurations "
    "that the other labels do not."
)


def build_tables(
    runs: pd.DataFrame, reference: pd.DataFrame, baseline: str = DEFAULT_BASELINE
) -> dict[str, tuple[pd.DataFrame, list[str]]]:
    return {
        "main": (main_table(runs), []),
        "qlora_table4": qlora_table4(runs, reference),
        "qalora_table1": qalora_table1(runs, reference),
        "datatype_perplexity": datatype_perplexity(runs, reference),
        "datatype_fidelity": (datatype_fidelity(runs), []),
        "deploy_fidelity": (deploy_fidelity(runs), []),
        "gguf_readers": (gguf_readers(runs), []),
        "methods": (methods_table(runs), []),
        "paired": (paired_table(runs, baseline), []),
    }


def write_tables(
    runs: pd.DataFrame,
    out: Path,
    results_label: str,
    reference: pd.DataFrame | None = None,
    baseline: str = DEFAULT_BASELINE,
) -> list[Path]:
    """Write every table as .md, .csv and .tex under ``out``; return the paths written. The paired table is
    written where its ``baseline`` has a run."""
    reference = load_reference() if reference is None else reference
    out.mkdir(parents=True, exist_ok=True)
    written = []
    source = f"Generated by `python -m analysis.tables` from {len(runs)} run record(s) in `{results_label}`."
    for name, (table, notes) in build_tables(runs, reference, baseline).items():
        if table.empty and name == "paired":
            continue
        caption = CAPTIONS[name].format(baseline=baseline)
        footnotes = [f"{'†' * (i + 1)} {note}" for i, note in enumerate(notes)]
        if table.astype(str).apply(lambda column: column.str.contains(MIXED, regex=False)).any(axis=None):
            footnotes.append(MIXED_NOTE)
        markdown = "\n\n".join([f"**{caption}**", to_markdown(table).rstrip("\n"), LEGEND, *footnotes, source])
        paths = {
            out / f"{name}.md": markdown + "\n",
            out / f"{name}.csv": table.to_csv(index=False, lineterminator="\n"),
            out / f"{name}.tex": to_latex(table, " ".join([caption, *footnotes]), name),
        }
        for path, text in paths.items():
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.tables", description=DESCRIPTION)
    parser.add_argument("--results", required=True, help="folder of run records (read recursively)")
    parser.add_argument("--out", required=True, help="folder for the .md, .csv and .tex files")
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"method the paired table compares every configuration to (default: {DEFAULT_BASELINE}, where it ran)",
    )
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.results)
        if args.baseline is not None:
            check_baseline(runs, args.baseline)
    except (NoRecordsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_tables(runs, Path(args.out), args.results, baseline=args.baseline or DEFAULT_BASELINE):
        print(path)
    return 0
