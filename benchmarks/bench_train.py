"""GPU training-throughput benchmark: the harness's training step against a bare reference loop.

For the Llama-2-7B shape with random weights (``model=llama_synthetic``, preset
``llama2_7b``), in one process on one GPU, it runs the harness's own training step
(methods from conf/method via Hydra compose, then ``experiments.harness.train.train``) for LoRA
bf16, QLoRA NF4 (Dettmers et al., arXiv 2305.14314), NF4 + double quantization, and
QA-LoRA (Xu et al., arXiv 2309.14717) when conf/method/qalora.yaml exists; then a bare
reference loop for QLoRA NF4 written with transformers + peft + bitsandbytes only, on
the same batch. For each it prints tokens/s (non-padding tokens after warm-up steps),
peak ``torch.cuda.max_memory_allocated`` (reset per method and per phase) and the peak
predicted by analysis.memory_model, and writes the figures as JSON and Markdown.

    python -m benchmarks.bench_train                       # Llama-2-7B shape, batch 1 x 512, on CUDA
    python -m benchmarks.bench_train --batch 4 --seq 1024 --rank 8   # the issue's A100 anchors' setting
    python -m benchmarks.bench_train --preset tiny --device cpu --steps 3 --warmup 1 --seq 32   # smoke test

Every method sees the same token ids (random, full length, no padding), so tokens/s
compare the training step only.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from experiments.harness.config import CONF
from experiments.harness.measure import optimizer_state_bytes, paged_state_bytes

HARNESS_METHODS = ("lora_bf16", "qlora_nf4", "qlora_nf4_dq", "qalora")
REFERENCE = "reference_qlora_nf4"
PAIRED = "qlora_nf4"  # the harness method the reference reimplements
GiB = 1024**3


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama2_7b", help="core.shapes.LLAMA_PRESETS key (tiny for a smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only: no memory figures)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"conf/method names (default: those of {', '.join(HARNESS_METHODS)} that exist)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the bare transformers+peft+bnb loop")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: each method config's)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per method, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument(
        "--optimizer",
        default=None,
        help="train.optimizer (default: paged_adamw_32bit on CUDA, QLoRA's; adamw_torch on CPU)",
    )
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default="results/bench_train", help="folder for <preset>.json and <preset>.md")
    return parser.parse_args(argv)


def check_device(args) -> torch.device:
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(
                "error: no CUDA device. This benchmark measures GPU throughput and peak CUDA memory; "
                "run it on a GPU machine, or smoke-test it here with --preset tiny --device cpu",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return torch.device(args.device)
    if args.device != "cpu":
        print(f"error: --device {args.device!r} is not cuda, cuda:N or cpu", file=sys.stderr)
        raise SystemExit(2)
    return torch.device("cpu")


def compose(method: str, args, optimizer: str):
    from experiments.harness.config import compose_config

    overrides = [
        f"method={method}",
        "model=llama_synthetic",
        f"model.preset={args.preset}",
        f"train.batch_size={args.batch}",
        f"train.max_seq_len={args.seq}",
        f"train.max_steps={args.steps}",
        f"train.measure_after_steps={args.warmup}",
        f"train.optimizer={optimizer}",
        f"train.gradient_checkpointing={not args.no_gradient_checkpointing}",
    ]
    if args.rank is not None:
        overrides.append(f"method.lora.r={args.rank}")
    return compose_config(*overrides)


def synthetic_spec(preset: str):
    """The harness's random Llama of the preset's shape, built directly on the device (no checkpoint on
    disk, no tokenizer: the benchmark feeds token ids, and a GPU machine may have no network)."""
    from core.errors import ConfigError
    from experiments.harness.models import random_llama_spec

    try:
        return random_llama_spec(preset)
    except ConfigError as error:
        raise SystemExit(f"error: --preset: {error}") from None


def same_batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    """The token ids every method trains on: random, full length, fixed by seed."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1234))


class _FixedBatches:
    """A BatchSource-compatible source that returns the same full-length batch every step."""

    def __init__(self, ids: torch.Tensor):
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def micro_batch(self, index: int) -> dict:
        return self.batch


def schedule(methods: list[str], with_reference: bool) -> list[str]:
    """The order of the runs. The harness's QLoRA NF4 and the bare loop that reimplements it run first,
    as A B B A, each twice, so that a steady drift over the process's life cancels from their ratio
    and each figure has a repeat. (On an H100 at batch 1 x 512, repeats of one configuration differed
    by 15-25% with no drift; at 4 x 1024 they agree within 1%: results/gpu/README.md.)"""
    if not with_reference:
        return list(methods)
    if PAIRED not in methods:
        return [*methods, REFERENCE]
    return [PAIRED, REFERENCE, REFERENCE, PAIRED, *(m for m in methods if m != PAIRED)]


def _mean_tokens_per_second(runs: list[dict], name: str) -> float | None:
    speeds = [r["tokens_per_second"] for r in runs if r["name"] == name and r["status"] == "ok"]
    return sum(speeds) / len(speeds) if speeds else None


def paired_ratio(runs: list[dict]) -> float | None:
    """Harness QLoRA NF4 tokens/s over the bare loop's, each the mean of its runs (the target is >= 0.98)."""
    harness, reference = _mean_tokens_per_second(runs, PAIRED), _mean_tokens_per_second(runs, REFERENCE)
    return harness / reference if harness and reference else None


def _reset(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: torch.device, paged_bytes: int = 0) -> dict:
    """CUDA peaks since the last reset; ``paged_bytes`` (unified memory the allocator does not see) is added
    to the allocated peak as ``max_allocated_plus_paged_bytes``, the figure the memory model predicts."""
    if device.type != "cuda":
        return {
            "max_allocated_bytes": None,
            "max_reserved_bytes": None,
            "paged_bytes": paged_bytes,
            "max_allocated_plus_paged_bytes": None,
        }
    torch.cuda.synchronize(device)
    allocated = torch.cuda.max_memory_allocated(device)
    return {
        "max_allocated_bytes": allocated,
        "max_reserved_bytes": torch.cuda.max_memory_reserved(device),
        "paged_bytes": paged_bytes,
        "max_allocated_plus_paged_bytes": allocated + paged_bytes,
    }


def predicted(method_cfg: dict, model_path: str, args, optimizer: str) -> dict:
    from analysis.memory_model import TrainShape, predict
    from analysis.method_specs import spec_from_method_config
    from analysis.model_shapes import resolve_shape

    prediction = predict(
        resolve_shape(model_path),
        spec_from_method_config(method_cfg),
        TrainShape(args.batch, args.seq, optimizer, not args.no_gradient_checkpointing),
    )
    return {
        key: prediction[key]
        for key in (
            "peak_allocated_bytes",
            "peak_device_bytes",
            "floor_allocated_bytes",
            "floor_device_bytes",
            "optimizer_paged_bytes",
        )
    }


def run_harness(method_name: str, args, device: torch.device, optimizer: str) -> dict:
    """The harness's path: Hydra-composed method -> load_base -> add_adapters -> experiments.harness.train.train."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from experiments.harness.train import TrainSettings, train
    from methods.base import LoadContext

    cfg = compose(method_name, args, optimizer)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method = instantiate(cfg.method, _convert_="all")
    spec = synthetic_spec(args.preset)
    settings = TrainSettings(**cfg.train)
    settings.check_device(device)
    _reset(device)
    started = time.perf_counter()
    model = method.load_base(spec, LoadContext(device=device))
    torch.manual_seed(0)
    model = method.add_adapters(model)
    load = {**_peaks(device), "wall_s": time.perf_counter() - started}
    _reset(device)
    result = train(model, _FixedBatches(same_batch(spec.vocab_size, args.batch, args.seq)), settings, device)
    figures = {
        "name": method_name,
        "kind": "harness",
        "load": load,
        "train": _peaks(device, result.optimizer_paged_bytes),
        "tokens_per_second": result.tokens_per_second,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "predicted": predicted(method_cfg, spec.path, args, optimizer),
    }
    del model, method, result
    return figures


def run_reference(args, device: torch.device, optimizer: str) -> dict:
    """QLoRA NF4's training written with transformers + peft + bitsandbytes only (of this project only the
    random base), with the same LoRA settings, optimizer, clipping and batch as the harness's qlora_nf4."""
    import bitsandbytes as bnb
    from omegaconf import OmegaConf
    from transformers import BitsAndBytesConfig

    from benchmarks.bare_loop import bare_lora, bare_step
    from methods.random_base import build_random_base

    cfg = compose("qlora_nf4", args, optimizer)
    lora = OmegaConf.to_container(cfg.method.lora, resolve=True)
    spec = synthetic_spec(args.preset)  # the same shape and seed as the harness's random base
    _reset(device)
    started = time.perf_counter()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head"],
    )
    # No checkpoint on disk: the same random NF4 base as the harness's (methods/random_base.py puts
    # bitsandbytes' Linear4bit where transformers' quantizer would). What this reference leaves
    # out of the project is everything from here on: adapters, training step, optimizer.
    model = build_random_base(spec.random_shape, device, torch.bfloat16, quantization)
    model.requires_grad_(False)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = bare_lora(model, lora)
    model.enable_input_require_grads()
    load = {**_peaks(device), "wall_s": time.perf_counter() - started}
    _reset(device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Not the harness's make_optimizer: this loop is the independent reference the harness is timed against.
    optimizers = {
        "adamw_torch": torch.optim.AdamW,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }
    opt = optimizers[optimizer](params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ids = same_batch(spec.vocab_size, args.batch, args.seq).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses, measured_tokens, measured_s = [], 0, 0.0
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(bare_step(model, batch, params, opt, cfg.train.max_grad_norm))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            measured_tokens += ids.numel()
            measured_s += time.perf_counter() - t0
    figures = {
        "name": REFERENCE,
        "kind": "reference (transformers + peft + bitsandbytes)",
        "load": load,
        "train": _peaks(device, paged_state_bytes(opt)),
        "tokens_per_second": measured_tokens / measured_s if measured_s else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "predicted": predicted(OmegaConf.to_container(cfg.method, resolve=True), spec.path, args, optimizer),
    }
    del model, opt, params
    return figures


def _guarded(run, name: str, device: torch.device) -> dict:
    """A method that runs out of memory or fails is a result: record it and go on."""
    try:
        return {"status": "ok", **run()}
    except torch.cuda.OutOfMemoryError as error:
        return {"name": name, "status": "oom", "error": str(error)[:500]}
    except Exception as error:  # noqa: BLE001 - keep benchmarking the other methods
        return {"name": name, "status": "failed", "error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        _reset(device)


def _gib(value) -> str:
    return f"{value / GiB:.2f}" if value else "-"


# Published figures to print beside ours (A100, Llama-2-7B, batch 4 x 1024, LoRA r=8).
ANCHORS = (("Hugging Face QLoRA (A100)", 2415, 9.0), ("Unsloth (A100)", 3726, 7.0))


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else "-"


def markdown(report: dict) -> str:
    s = report["settings"]
    reference_tps = _mean_tokens_per_second(report["runs"], REFERENCE)
    lines = [
        f"# Training throughput and memory: {s['preset']} shape, random weights",
        "",
        f"Device: {report['device']}; batch {s['batch']} x {s['seq']} tokens, LoRA rank "
        f"{s['rank'] or 'from config'}, optimizer {s['optimizer']}, gradient checkpointing "
        f"{s['gradient_checkpointing']}, {s['steps']} steps ({s['warmup']} warm-up). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        "",
        "Memory is the training phase's peak of torch.cuda.max_memory_allocated plus the paged optimizer "
        "state (CUDA unified memory, which the allocator does not count); the prediction is "
        "analysis.memory_model's peak_device_bytes, the floor its floor_device_bytes.",
        "",
        "| run | status | tokens/s | / bare loop (mean) | peak allocated (GiB) | paged (GiB) | "
        "allocated + paged (GiB) | "
        "predicted (GiB) | measured / predicted | predicted floor (GiB) | measured / floor | "
        "peak reserved (GiB) | load peak (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']} | {r.get('error', '')[:120]} |" + " |" * 10)
            continue
        train, pred = r["train"], r["predicted"]
        measured = train["max_allocated_plus_paged_bytes"]
        lines.append(
            f"| {r['name']} | ok | {r['tokens_per_second']:.0f} | {_ratio(r['tokens_per_second'], reference_tps)} | "
            f"{_gib(train['max_allocated_bytes'])} | {_gib(train['paged_bytes'])} | {_gib(measured)} | "
            f"{_gib(pred['peak_device_bytes'])} | {_ratio(measured, pred['peak_device_bytes'])} | "
            f"{_gib(pred['floor_device_bytes'])} | {_ratio(measured, pred['floor_device_bytes'])} | "
            f"{_gib(train['max_reserved_bytes'])} | {_gib(r['load']['max_allocated_bytes'])} |"
        )
    ratio = report.get("harness_over_reference")
    if ratio:
        lines += [
            "",
            f"Harness QLoRA NF4 over the bare loop, means of their runs (run in the order A B B A): "
            f"{ratio:.3f} (target: at least 0.98).",
        ]
    lines += [
        "",
        "Published anchors (A100, Llama-2-7B, batch 4 x 1024, r=8; not measured here): "
        + "; ".join(f"{name} about {tps:,} tokens/s at {gb:.0f} GB" for name, tps, gb in ANCHORS)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = check_device(args)
    optimizer = args.optimizer or ("paged_adamw_32bit" if device.type == "cuda" else "adamw_torch")
    methods = args.methods or [m for m in HARNESS_METHODS if (CONF / "method" / f"{m}.yaml").exists()]
    import bitsandbytes
    import peft
    import transformers

    runs = []
    for name in schedule(methods, with_reference=not args.no_reference):
        print(f"[bench] {name} ...", flush=True)
        if name == REFERENCE:
            runs.append(_guarded(lambda: run_reference(args, device, optimizer), REFERENCE, device))
        else:
            runs.append(_guarded(lambda name=name: run_harness(name, args, device, optimizer), name, device))
    report = {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test: no memory figures)"
        ),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "settings": {
            "preset": args.preset,
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "steps": args.steps,
            "warmup": args.warmup,
            "optimizer": optimizer,
            "gradient_checkpointing": not args.no_gradient_checkpointing,
        },
        "runs": runs,
        "harness_over_reference": paired_ratio(runs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.preset}_b{args.batch}_s{args.seq}" + (f"_r{args.rank}" if args.rank else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return report


if __name__ == "__main__":
    report = main(sys.argv[1:])
    sys.exit(0 if all(r["status"] == "ok" for r in report["runs"]) else 1)
