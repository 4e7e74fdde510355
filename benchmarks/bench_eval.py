"""Benchmark: the harness's MMLU evaluator against lm-eval, same model, same questions, one process.

    python -m benchmarks.bench_eval --limit-per-subject 4 --shots 0 5

For each number of shots it runs both backends (experiments.evaluation.mmlu and
experiments.evaluation.lm_eval_backend) on the same loaded model and the same questions, and
prints questions/s for each, the speed ratio, the agreement of per-question
predictions and both accuracies, the largest log-probability difference, and the
issue's memory bound for the harness (see ``memory_check``). Results
also go to a JSON file (``--out``). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from analysis.model_shapes import shape_from_config
from core.tensors import tensor_bytes
from experiments.evaluation.lm_eval_backend import evaluate_mmlu_lm_eval
from experiments.evaluation.mmlu import evaluate_mmlu
from experiments.harness.measure import PhaseMeter, set_heap_policy
from experiments.harness.models import load_tokenizer, resolve_model
from methods.loading import load_pretrained
from methods.settings import DTYPES


def compare(ours: dict, reference: dict) -> dict:
    theirs = {p["index"]: p for p in reference["predictions"]}
    same = sum(p["pred"] == theirs[p["index"]]["pred"] for p in ours["predictions"])
    max_diff = max(
        max(abs(a - b) for a, b in zip(p["logprobs"], theirs[p["index"]]["logprobs"])) for p in ours["predictions"]
    )
    return {
        "agreement": same / len(ours["predictions"]),
        "acc_diff_points": 100 * (ours["acc"] - reference["acc"]),
        "max_logprob_diff": max_diff,
    }


def run_backend(name: str, model, tokenizer, meter: PhaseMeter, **kwargs) -> tuple[dict, dict]:
    evaluate = evaluate_mmlu if name == "harness" else evaluate_mmlu_lm_eval
    with meter.phase(f"{name}_{kwargs['num_fewshot']}shot") as phase:
        result = evaluate(model, tokenizer, **kwargs)
    n = result["n_questions"]
    return result, {
        "backend": name,
        "backend_version": result["backend_version"],
        "questions": n,
        "seconds": round(phase.wall_s, 2),
        "questions_per_second": n / phase.wall_s,
        "acc": result["acc"],
        "peak_memory_bytes": phase.peak_memory_bytes,
        "memory_growth_bytes": phase.peak_memory_bytes - phase.memory_at_start_bytes,
    }


def kv_bytes_per_position(model) -> int:
    shape = shape_from_config(model.config.to_dict(), model.config.name_or_path or "model")
    return 2 * shape.num_layers * shape.kv_dim * next(model.parameters()).element_size()  # keys and values


def memory_check(model, harness: dict, row: dict) -> dict:
    """The issue's memory bound: weights plus evaluation's own growth, against weights plus one batch.

    One batch's activations are taken as the KV cache of the largest batch the harness
    ran (prefix included). That leaves out one layer's transient tensors, so the ratio
    printed is at or above the issue's. Under 1.5, it also shows that prefix caches are
    not kept across subjects.
    """
    weights = sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])
    batch = harness["largest_batch_positions"] * kv_bytes_per_position(model)
    return {
        "weights_bytes": weights,
        "largest_batch_kv_bytes": batch,
        "memory_ratio": (weights + row["memory_growth_bytes"]) / (weights + batch),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-per-subject", type=int, default=4, help="questions per subject (57 subjects)")
    parser.add_argument("--subjects", nargs="*", default=None, help="subject names as in the data file")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/bench_eval.json"))
    args = parser.parse_args(argv)
    set_heap_policy("exact")

    spec = resolve_model(OmegaConf.create({"name": "smollm2_135m", "kind": "bundled_gguf"}))
    device = torch.device(args.device)
    model = load_pretrained(spec, device, DTYPES[args.dtype])
    tokenizer = load_tokenizer(spec)
    meter = PhaseMeter(device)
    report = {
        "model": spec.name,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "limit_per_subject": args.limit_per_subject,
        "runs": [],
    }
    for shots in args.shots:
        kwargs = dict(
            num_fewshot=shots,
            subjects=args.subjects,
            limit_per_subject=args.limit_per_subject,
            batch_size=args.batch_size,
            progress=False,
        )
        ours, ours_row = run_backend("harness", model, tokenizer, meter, **kwargs)
        reference, ref_row = run_backend("lm_eval", model, tokenizer, meter, **kwargs)
        row = {
            "num_fewshot": shots,
            "harness": ours_row,
            "lm_eval": ref_row,
            "speedup": ours_row["questions_per_second"] / ref_row["questions_per_second"],
            # the speed-up that skipping work alone would give: every prompt token once
            # (lm-eval, which also pads) against what the harness runs through the model
            "prompt_tokens": ours["prompt_tokens"],
            "harness_tokens_forward": ours["tokens_forward"],
            "work_ratio": ours["prompt_tokens"] / ours["tokens_forward"],
            **compare(ours, reference),
            **memory_check(model, ours, ours_row),
        }
        report["runs"].append(row)
        print(
            f"{shots}-shot, {ours_row['questions']} questions: harness {ours_row['questions_per_second']:.2f} q/s, "
            f"lm-eval {ref_row['questions_per_second']:.2f} q/s, speedup {row['speedup']:.1f}x "
            f"(token work ratio {row['work_ratio']:.1f}x), "
            f"agreement {100 * row['agreement']:.2f}%, acc {ours_row['acc']:.4f} vs {ref_row['acc']:.4f} "
            f"(max |dlogprob| {row['max_logprob_diff']:.2e}); harness memory (weights + growth) / "
            f"(weights + largest batch's KV cache) {row['memory_ratio']:.2f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
