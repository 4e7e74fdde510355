"""Every method preset through the real command line on the bundled SmolLM2, on one device, then the
sharded and replicated strategies as one rank: the GPU check's coverage of what users run
(scripts/gpu_check.sh).

Each conf/method/ preset runs as ``python -m experiments.run -m experiment=methods_small
method=<presets>`` (16 training steps, MMLU 5-shot on 2 questions per subject, perplexity on
4,096 held-out tokens, KL divergence against the 16-bit base: the committed CPU records of
``results/methods_small`` were made with the same settings), and a preset whose adapter merges
writes the merged 16-bit export, scored again. The GPTQ presets need GPTQModel: where it is not
installed they are listed as not run, with the reason. Then ``train.strategy=fsdp`` and ``ddp``
with ``train.nproc=1`` (on CUDA: NCCL, the rank's GPU, sharded checkpoints) train presets whose
single-process losses the first part recorded, and the losses are compared.

    python -m benchmarks.gpu_presets --out DIR                      # every preset, on CUDA
    python -m benchmarks.gpu_presets --out DIR --device cpu --quick --methods lora_bf16 prefix_bf16

Writes ``presets.json`` and ``presets.md`` into DIR (records in DIR/records; the exported checkpoints
are deleted once scored); exits 1 when a run that was started did not end ok.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.harness.config import CONF, compose_config

# Whole settings of experiment=methods_small; --quick shrinks them to seconds per preset (the dry run).
QUICK = (
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.num_fewshot=1",
    "eval.limit_per_subject=1",
    "eval.subjects=[anatomy,astronomy]",
    "eval.perplexity.max_tokens=512",
)
MERGED_EXPORT = "export.formats=[merged_16bit]"
# (preset, strategy): FSDP shards what it can (a 16-bit base built on meta, bitsandbytes 4-bit storage),
# DDP replicates the others (a prompt adapter here).
STRATEGY_RUNS = (("lora_bf16", "fsdp"), ("qlora_nf4", "fsdp"), ("prefix_bf16", "ddp"))


def all_presets() -> list[str]:
    return sorted(path.stem for path in (CONF / "method").glob("*.yaml"))


def why_not_run(preset: str, device: str) -> str | None:
    """Why ``preset`` cannot run here, or None."""
    if "gptq" in preset and importlib.util.find_spec("gptqmodel") is None:
        return "needs GPTQModel (the [gptq] extra), not installed here"
    if preset == "lora_fp16" and device == "cpu":
        return "float16 products are emulated on CPUs (about 100 s a step on SmolLM2)"
    return None


def mergeable(preset: str) -> bool:
    from experiments.harness.plan import instantiate_method

    return instantiate_method(compose_config(f"method={preset}")).mergeable


def run_cli(args: list[str], log: Path) -> tuple[int, float]:
    """``python -m experiments.run *args``, its output into ``log``; exit code and seconds."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "experiments.run", *args], stdout=handle, stderr=subprocess.STDOUT)
    return done.returncode, time.perf_counter() - start


def read_records(folder: Path) -> dict[str, dict]:
    """The records in ``folder`` by method name."""
    records = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        records[record["config"]["method"]["name"]] = record
    return records


def _get(record: dict, *keys):
    value = record
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def preset_row(name: str, record: dict | None, reason: str | None) -> dict:
    if record is None:
        return {"method": name, "status": "not run" if reason else "no record", "why": reason}
    export = next(iter((record.get("exports") or {}).items()), (None, {}))
    train = record.get("train") or {}
    peak = _get(record, "phases", "train", "cuda_max_allocated_bytes") or _get(
        record, "phases", "train", "peak_memory_bytes"
    )
    return {
        "method": name,
        "status": record["status"],
        "why": (record.get("error") or {}).get("message"),
        "compute_dtype": _get(record, "method", "compute_dtype"),
        "final_loss": (train.get("losses") or [None])[-1],
        "train_tokens_per_s": train.get("tokens_per_second"),
        "train_peak_bytes": peak,
        "mmlu_acc": _get(record, "eval", "mmlu", "acc"),
        "mmlu_n": _get(record, "eval", "mmlu", "n_questions"),
        "perplexity": _get(record, "eval", "perplexity", "perplexity"),
        "kl_mean_vs_base": _get(record, "eval", "fidelity", "vs_base", "kl_mean"),
        "export": export[0],
        "export_status": export[1].get("status"),
        "export_perplexity": export[1].get("perplexity"),
    }


def max_relative_difference(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict) -> str:
    lines = [f"# Method presets on {report['device_name']} ({report['settings']})", ""]
    columns = list(report["presets"][0]) if report["presets"] else []
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in report["presets"]]
    if report["strategies"]:
        lines += ["", "## One rank of the multi-process strategies against the single process", ""]
        columns = list(report["strategies"][0])
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in report["strategies"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--methods", nargs="+", default=None, help="presets to run (default: every one)")
    parser.add_argument("--quick", action="store_true", help="seconds per preset (the dry run)")
    parser.add_argument("--no-strategies", action="store_true", help="skip the one-rank fsdp and ddp runs")
    args = parser.parse_args(argv)
    presets = args.methods or all_presets()
    unknown = sorted(set(presets) - set(all_presets()))
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; valid: {', '.join(all_presets())}")
    out = args.out.resolve()
    records_dir = out / "records"
    out.mkdir(parents=True, exist_ok=True)
    common = ["experiment=methods_small", f"device={args.device}", f"results_dir={records_dir}", "skip_done=false"]
    common += list(QUICK) if args.quick else []
    skipped = {name: why_not_run(name, args.device) for name in presets}
    runnable = [name for name in presets if skipped[name] is None]
    groups = {
        "merged": [name for name in runnable if mergeable(name)],
        "unmerged": [name for name in runnable if not mergeable(name)],
    }
    wall = {}
    for group, names in groups.items():
        if names:
            extra = [MERGED_EXPORT] if group == "merged" else []
            sweep = [f"method={','.join(names)}", *extra, f"hydra.sweep.dir={out / ('multirun_' + group)}"]
            code, wall[group] = run_cli(["-m", *common, *sweep], out / f"presets_{group}.log")
            print(f"presets ({group}): {', '.join(names)}: exit {code} in {wall[group]:.0f} s", flush=True)
    for exported in out.glob("multirun_*/*/exports"):  # the merged checkpoints: scored, then not kept
        shutil.rmtree(exported)
    records = read_records(records_dir)
    rows = [preset_row(name, records.get(name), skipped[name]) for name in presets]

    strategies = []
    if not args.no_strategies:
        for name, strategy in STRATEGY_RUNS:
            if name not in runnable:
                continue
            single = records.get(name) or {}  # compared with where it trained; run either way
            folder = out / f"records_{strategy}"
            run_args = [*common, f"method={name}", f"results_dir={folder}", f"train.strategy={strategy}"]
            run_args += ["train.nproc=1", "train.checkpoint_every=4", f"hydra.run.dir={out / ('run_' + strategy)}"]
            code, seconds = run_cli(run_args, out / f"{strategy}_{name}.log")
            record = read_records(folder).get(name)
            losses = _get(record, "train", "losses") if record else None
            strategies.append(
                {
                    "method": name,
                    "strategy": strategy,
                    "exit": code,
                    "status": record["status"] if record else "no record",
                    "backend": _get(record, "env", "distributed", "backend") if record else None,
                    "losses_max_rel_diff_vs_single": max_relative_difference(losses, _get(single, "train", "losses")),
                    "perplexity": _get(record, "eval", "perplexity", "perplexity") if record else None,
                    "single_perplexity": _get(single, "eval", "perplexity", "perplexity"),
                    "wall_s": round(seconds, 1),
                }
            )
            print(f"{strategy} {name}: exit {code}, {strategies[-1]['status']} in {seconds:.0f} s", flush=True)

    any_record = next(iter(records.values()), {})
    report = {
        "device_name": _get(any_record, "env", "device_name") or args.device,
        "settings": "experiment=methods_small" + (" --quick" if args.quick else ""),
        "packages": _get(any_record, "env", "packages"),
        "wall_s": {group: round(seconds, 1) for group, seconds in wall.items()},
        "presets": rows,
        "strategies": strategies,
    }
    (out / "presets.json").write_text(json.dumps(report, indent=1))
    (out / "presets.md").write_text(markdown(report))
    print(markdown(report))
    failed = [r["method"] for r in rows if r["status"] not in ("ok", "not run")]
    failed += [f"{r['strategy']} {r['method']}" for r in strategies if r["status"] != "ok"]
    if failed:
        print(f"not ok: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
