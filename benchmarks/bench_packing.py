"""Training throughput on real data: plain padded batches against packed rows and the chunked loss.

The main job's training (the bundled SmolLM2-135M, the 456 reserved MMLU questions, batch 4, lengths
46 to 512 tokens) through the harness's own training step (``experiments.harness.train.train``), for
each method in three settings: plain (each example its own row, right-padded to the batch's longest),
``train.packing`` (experiments/harness/data.py's ``pack``) and packing with ``train.loss=chunked``
(experiments/harness/loss.py). Tokens/s count real tokens only; the padded share is of the positions
the model computed. Within a method the settings run as A B C C B A in one process, so that a steady
drift cancels from the ratios, and every setting trains from the same initial adapter on the same
batches, so the losses agree (to float rounding).

    python -m benchmarks.bench_packing                          # lora_bf16 and qlora_nf4, 10 steps each
    python -m benchmarks.bench_packing --methods lora_bf16 --steps 4 --warmup 1 --out /tmp/bench   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

SETTINGS = {  # name -> (train.packing, train.loss)
    "plain": (False, "full"),
    "packed": (True, "full"),
    "packed_chunked": (True, "chunked"),
}
GIT_DESCRIBE = ["git", "describe", "--always", "--dirty"]  # the commit, "-dirty" when the tree is not clean
ORDER = ["plain", "packed", "packed_chunked", "packed_chunked", "packed", "plain"]  # A B C C B A


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["lora_bf16", "qlora_nf4"], help="conf/method names")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="results/bench_packing", help="folder for bench_packing.json and .md")
    return parser.parse_args(argv)


def main_job_config(method: str, args, packing: bool, loss: str):
    """The main job's training config (conf/experiment/quickstart.yaml) for one method and setting."""
    from experiments.harness.config import compose_config

    return compose_config(
        "experiment=quickstart",
        f"method={method}",
        f"train.max_steps={args.steps}",
        f"train.measure_after_steps={args.warmup}",
        f"train.packing={str(packing).lower()}",
        f"train.loss={loss}",
        f"device={args.device}",
    )


def run_one(method: str, setting: str, args, device: torch.device, data: dict) -> dict:
    from hydra.utils import instantiate

    from core.compute_dtype import resolve_auto_compute_dtype
    from experiments.harness.data import BatchSource
    from experiments.harness.train import TrainSettings, train
    from methods.base import LoadContext

    packing, loss = SETTINGS[setting]
    cfg = main_job_config(method, args, packing, loss)
    resolve_auto_compute_dtype(cfg.method, device)  # as a run does: float32 on a CPU without native bfloat16
    built = instantiate(cfg.method, _convert_="all")
    model = built.load_base(data["spec"], LoadContext(device=device))
    torch.manual_seed(cfg.seed)
    model = built.add_adapters(model)
    batches = BatchSource(data["examples"], cfg.train.batch_size, data["pad_id"], cfg.seed)
    started = time.perf_counter()
    result = train(model, batches, TrainSettings(**cfg.train), device)
    return {
        "method": method,
        "setting": setting,
        "compute_dtype": str(cfg.method.compute_dtype),
        "tokens_per_second": result.tokens_per_second,
        "tokens": result.tokens,
        "padded_tokens": result.padded_tokens,
        "padded_share": result.padded_tokens / (result.tokens + result.padded_tokens),
        "losses": result.losses,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def load_data(args) -> dict:
    from experiments.harness.data import load_examples, tokenize_examples
    from experiments.harness.models import load_tokenizer, resolve_model

    cfg = main_job_config(args.methods[0], args, False, "full")
    spec = resolve_model(cfg.model)
    tokenizer = load_tokenizer(spec)
    examples = tokenize_examples(
        load_examples(cfg.data), tokenizer, cfg.train.max_seq_len, cfg.train.train_on_prompt, None
    )
    return {"spec": spec, "examples": examples, "pad_id": tokenizer.pad_token_id}


def summary(runs: list[dict]) -> list[dict]:
    """Per method and setting: mean real tokens/s of its runs and the ratio to the same method's plain."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        speeds = {
            s: [r["tokens_per_second"] for r in runs if r["method"] == method and r["setting"] == s] for s in SETTINGS
        }
        plain = sum(speeds["plain"]) / len(speeds["plain"])
        for setting, values in speeds.items():
            mean = sum(values) / len(values)
            share = next(r["padded_share"] for r in runs if r["method"] == method and r["setting"] == setting)
            rows.append(
                {
                    "method": method,
                    "setting": setting,
                    "tokens_per_second": round(mean, 1),
                    "runs": [round(v, 1) for v in values],
                    "padded_share": round(share, 3),
                    "speedup_vs_plain": round(mean / plain, 3),
                }
            )
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"Real-data training throughput ({report['command']}), commit {report['commit']}, {report['cpu']}, "
        f"torch {report['torch']}, {report['date']}.",
        "",
        "| method | setting | real tokens/s | runs | padded share | vs plain |",
        "|---|---|---:|---|---:|---:|",
    ]
    for row in report["summary"]:
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['tokens_per_second']} | "
            f"{', '.join(map(str, row['runs']))} | {row['padded_share']:.1%} | {row['speedup_vs_plain']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import sys

    from core.compute_dtype import CPU_BF16_FLAGS
    from core.cpu import cpu_flags, cpu_model_name

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    data = load_data(args)
    runs = [run_one(method, setting, args, device, data) for method in args.methods for setting in ORDER]
    for method in args.methods:  # every setting trained on the same batches from the same start
        losses = [r["losses"] for r in runs if r["method"] == method]
        spread = max(abs(a - b) / abs(b) for other in losses for a, b in zip(other, losses[0]))
        print(f"{method}: losses of every setting within {spread:.1e} (relative) of plain's")
    report = {
        "command": " ".join(["python -m benchmarks.bench_packing", *argv]),
        "commit": subprocess.run(GIT_DESCRIBE, capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model_name(),
        "cpu_native_bf16": bool(cpu_flags() & set(CPU_BF16_FLAGS)),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "summary": summary(runs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_packing.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench_packing.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
