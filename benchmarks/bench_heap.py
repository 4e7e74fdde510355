"""What the CPU heap policy (``cpu_heap``, experiments/harness/measure.py) costs and gives: whole CLI runs.

Each method runs as a user runs it, ``python -m experiments.run experiment=<experiment> method=<m>``, once
with ``cpu_heap=exact`` and once with ``cpu_heap=fast``, each in a fresh process, in the order A B B A so
that a steady drift of the machine cancels from the ratios. From the records: each phase's wall time, the
training's peak memory, and the figures the run measured (they must not move: the heap changes where freed
memory goes, not what is computed). ``fast`` over ``exact`` is the speed-up and the peak's overstatement.

    python -m benchmarks.bench_heap                                  # qlora_nf4 and lora_bf16, comparison_small
    python -m benchmarks.bench_heap --methods qlora_nf4 --overrides train.max_steps=0 --out /tmp/heap  # untrained
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import stamp, write_report

POLICIES = ("exact", "fast")
PHASES = ("forgetting_before", "train", "eval_mmlu", "eval_forgetting", "eval_fidelity")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_heap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["qlora_nf4", "lora_bf16"], help="conf/method names")
    parser.add_argument("--experiment", default="comparison_small", help="conf/experiment name")
    parser.add_argument("--overrides", nargs="*", default=[], help="more config overrides for every run")
    parser.add_argument("--out", default="results/bench_heap", help="folder for bench_heap.json and .md")
    return parser.parse_args(argv)


def run_cli(method: str, policy: str, args, folder: Path) -> dict:
    """One run in a fresh process; its record's phase times, training peak and measured figures."""
    results = folder / f"{method}-{policy}-{len(list(folder.iterdir()))}"
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        f"experiment={args.experiment}",
        f"method={method}",
        f"cpu_heap={policy}",
        f"results_dir={results}",
        f"checkpoint_dir={results / 'ck'}",
        f"hydra.run.dir={results / 'out'}",
        "reference_results=null",
        "save_adapter=false",
        *args.overrides,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    [path] = results.glob("*.json")
    record = json.loads(path.read_text())
    evaluation = record["eval"]
    return {
        "method": method,
        "policy": policy,
        "process_s": round(time.perf_counter() - started, 1),
        "phases_s": {name: phase["wall_s"] for name, phase in record["phases"].items()},
        "train_peak_bytes": (record["train"] or {}).get("peak_memory_bytes"),
        "figures": {
            "loss_last": (record["train"] or {}).get("loss_last"),
            "mmlu_acc": evaluation["mmlu"]["acc"],
            "perplexity": evaluation.get("perplexity", {}).get("perplexity"),
            "forgetting_loss_after": evaluation.get("forgetting", {}).get("loss_after"),
        },
    }


def summary(runs: list[dict]) -> list[dict]:
    """Per method: mean seconds per phase under each policy, fast / exact for each, and for the training peak."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        of = {policy: [r for r in runs if r["method"] == method and r["policy"] == policy] for policy in POLICIES}
        row = {"method": method}
        for key in ("process_s", *PHASES):
            means = {}
            for policy, ran in of.items():
                values = [r["process_s"] if key == "process_s" else r["phases_s"].get(key) for r in ran]
                means[policy] = sum(values) / len(values) if None not in values and values else None
            if None not in means.values():
                row[key] = {**{p: round(v, 2) for p, v in means.items()}, "fast_over_exact": round(
                    means["fast"] / means["exact"], 3)}  # fmt: skip
        peaks = {policy: max((r["train_peak_bytes"] or 0) for r in ran) for policy, ran in of.items()}
        if peaks["exact"]:
            row["train_peak_bytes"] = {**peaks, "fast_over_exact": round(peaks["fast"] / peaks["exact"], 3)}
        first = [r["figures"] for r in runs if r["method"] == method]
        row["figures_equal"] = all(figures == first[0] for figures in first)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"CPU heap policy, whole CLI runs ({report['command']}), commit {report['commit']}, {report['cpu']}, "
        f"torch {report['torch']}, {report['date']}. Seconds, each the mean of two runs: exact / fast = fast over "
        "exact; training peaks in GB, exact / fast.",
        "",
        "| method | " + " | ".join(("whole process", *PHASES)) + " | training peak GB | figures equal |",
        "|---|" + "---:|" * (len(PHASES) + 2) + "---|",
    ]
    for row in report["summary"]:
        cells = []
        for key in ("process_s", *PHASES):
            cell = row.get(key)
            cells.append(f"{cell['exact']:.1f} / {cell['fast']:.1f} = {cell['fast_over_exact']:.2f}x" if cell else "-")
        peak = row.get("train_peak_bytes")
        peak_cell = f"{peak['exact'] / 1e9:.2f} / {peak['fast'] / 1e9:.2f}" if peak else "-"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {peak_cell} | {row['figures_equal']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            for policy in (*POLICIES, *POLICIES[::-1]):
                runs.append(run_cli(method, policy, args, Path(scratch)))
                print(json.dumps(runs[-1]), flush=True)
    report = {**stamp("bench_heap", argv), "threads": torch.get_num_threads(), "runs": runs, "summary": summary(runs)}
    write_report(args.out, "bench_heap", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
