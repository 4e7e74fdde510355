"""Training throughput on real data: plain padded batches against packed rows, the chunked loss and fused
kernels, with a bare transformers + peft loop beside them (the real-data mode of the training benchmark;
benchmarks/bench_train.py times one fixed random batch on the 7B shape).

The main job's training (the bundled SmolLM2-135M, the 456 reserved MMLU questions, batch 4, lengths
46 to 512 tokens) through the harness's own training step (``experiments.harness.train.train``), for
each method in these settings: plain (each example its own row, right-padded to the batch's longest),
``train.packing`` (experiments/harness/data.py's ``pack``), packing with ``train.loss=chunked``
(experiments/harness/loss.py) and, on CUDA, packing with ``train.kernels=liger`` (Liger-Kernel,
experiments/harness/kernels.py); and ``bare``: the same model, adapter, optimizer and padded batches in a
loop of transformers + peft (+ bitsandbytes) calls only, the Hugging Face baseline the harness is read
against. Tokens/s count real tokens only; the padded share is of the positions the model computed.
Within a method the runs go A B C D D C B A in one process, so that a steady drift cancels from the
ratios, and every run trains from the same initial adapter on the same batches, so the losses agree (to
float rounding; Liger's kernels to bf16 rounding).

    python -m benchmarks.bench_packing                          # lora_bf16 and qlora_nf4, 10 steps each
    python -m benchmarks.bench_packing --methods lora_bf16 --steps 4 --warmup 1 --out /tmp/bench   # quicker
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.report import stamp, write_report

SETTINGS = {  # name -> (train.packing, train.loss, train.kernels)
    "plain": (False, "full", "none"),
    "packed": (True, "full", "none"),
    "packed_chunked": (True, "chunked", "none"),
    "packed_liger": (True, "full", "liger"),  # CUDA only
}
BARE = "bare"  # transformers + peft on the plain padded batches, no harness code in the step


def order(device: torch.device, bare: bool) -> list[str]:
    """The runs of one method: its settings on this device, then back in reverse (A B C D D C B A)."""
    names = [name for name in SETTINGS if name != "packed_liger" or device.type == "cuda"] + ([BARE] if bare else [])
    return names + names[::-1]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["lora_bf16", "qlora_nf4"], help="conf/method names")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare transformers + peft loop")
    parser.add_argument("--out", default="results/bench_packing", help="folder for bench_packing.json and .md")
    return parser.parse_args(argv)


def main_job_config(method: str, args, setting: str = "plain"):
    """The main job's training config (conf/experiment/quickstart.yaml) for one method and setting."""
    from core.compute_dtype import resolve_auto_compute_dtype
    from experiments.harness.config import compose_config

    packing, loss, kernels = SETTINGS[setting]
    cfg = compose_config(
        "experiment=quickstart",
        f"method={method}",
        f"train.max_steps={args.steps}",
        f"train.measure_after_steps={args.warmup}",
        f"train.packing={str(packing).lower()}",
        f"train.loss={loss}",
        f"train.kernels={kernels}",
        f"device={args.device}",
    )
    resolve_auto_compute_dtype(cfg.method, torch.device(args.device))  # as a run does: float32 without native bf16
    return cfg


def run_one(method: str, setting: str, args, device: torch.device, data: dict) -> dict:
    from hydra.utils import instantiate

    from experiments.harness.data import BatchSource
    from experiments.harness.train import TrainSettings, train
    from methods.base import LoadContext

    if setting == BARE:
        return run_bare(method, args, device, data)
    cfg = main_job_config(method, args, setting)
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


def run_bare(method: str, args, device: torch.device, data: dict) -> dict:
    """The method's training as a bare loop: the checkpoint loaded by transformers (with bitsandbytes' 4-bit
    config for a QLoRA preset), peft's LoRA, torch's AdamW and transformers' schedule, clipping,
    ``model(**batch).loss`` on the plain padded batches. Of the harness only the batches (the same rows as
    ``plain``) and the one load function (methods/loading.py, which keeps the Hub's kernels off) are used."""
    from omegaconf import OmegaConf
    from transformers import BitsAndBytesConfig, get_scheduler

    from benchmarks.bare_loop import bare_lora, bare_step
    from experiments.harness.data import BatchSource
    from methods.loading import load_pretrained

    cfg = main_job_config(method, args)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    if method_cfg["adapter"] != "lora" or method_cfg["base"] not in ("bf16", "nf4"):
        raise SystemExit(f"error: the bare loop reimplements LoRA on bf16 and NF4, not {method}")
    compute = getattr(torch, method_cfg["compute_dtype"])
    quantization = None
    if method_cfg["base"] == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=["lm_head"],
        )
    model = load_pretrained(data["spec"], device, compute, quantization)
    lora = method_cfg["lora"]
    torch.manual_seed(cfg.seed)
    model = bare_lora(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(  # the run's schedule, as the Hugging Face Trainer builds it
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=args.steps
    )
    batches = BatchSource(data["examples"], cfg.train.batch_size, data["pad_id"], cfg.seed)
    losses, tokens, padded, measured_tokens, measured_s = [], 0, 0, 0, 0.0
    started = time.perf_counter()
    for step in range(args.steps):
        batch = {key: value.to(device) for key, value in batches.micro_batch(step).items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(round(bare_step(model, batch, params, optimizer, cfg.train.max_grad_norm, scheduler), 6))
        real = int(batch["attention_mask"].sum())  # counted as the harness counts: every step, real tokens apart
        tokens, padded = tokens + real, padded + batch["attention_mask"].numel() - real
        if step >= args.warmup:
            measured_s += time.perf_counter() - t0
            measured_tokens += real
    return {
        "method": method,
        "setting": BARE,
        "compute_dtype": method_cfg["compute_dtype"],
        "tokens_per_second": measured_tokens / measured_s if measured_s else None,
        "tokens": tokens,
        "padded_tokens": padded,
        "padded_share": padded / (tokens + padded) if tokens else 0.0,
        "losses": losses,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def load_data(args) -> dict:
    from experiments.harness.data import load_examples, tokenize_examples
    from experiments.harness.models import load_tokenizer, resolve_model

    cfg = main_job_config(args.methods[0], args)
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
        ran = dict.fromkeys(r["setting"] for r in runs if r["method"] == method)
        speeds = {s: [r["tokens_per_second"] for r in runs if r["method"] == method and r["setting"] == s] for s in ran}
        plain = sum(speeds["plain"]) / len(speeds["plain"])
        bare = sum(speeds[BARE]) / len(speeds[BARE]) if BARE in speeds else None
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
                    "speedup_vs_bare": round(mean / bare, 3) if bare else None,
                }
            )
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"Real-data training throughput ({report['command']}), commit {report['commit']}, {report['cpu']}, "
        f"torch {report['torch']}, {report['date']}.",
        "",
        "| method | setting | real tokens/s | runs | padded share | vs plain | vs bare loop |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in report["summary"]:
        versus_bare = f"{row['speedup_vs_bare']:.2f}x" if row.get("speedup_vs_bare") else "-"
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['tokens_per_second']} | "
            f"{', '.join(map(str, row['runs']))} | {row['padded_share']:.1%} | {row['speedup_vs_plain']:.2f}x | "
            f"{versus_bare} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    data = load_data(args)
    schedule = order(device, bare=not args.no_bare)
    runs = [run_one(method, setting, args, device, data) for method in args.methods for setting in schedule]
    for method in args.methods:  # every setting trained on the same batches from the same start
        losses = [r["losses"] for r in runs if r["method"] == method]
        spread = max(abs(a - b) / abs(b) for other in losses for a, b in zip(other, losses[0]))
        print(f"{method}: losses of every setting within {spread:.1e} (relative) of plain's")
    report = {
        **stamp("bench_packing", argv),
        "runs": runs,
        "summary": summary(runs),
    }
    write_report(args.out, "bench_packing", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
