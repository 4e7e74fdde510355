"""The hardware table: model size x method -> predicted GPU memory, beside published estimates.

Every predicted figure comes from analysis.memory_model; the published figures are the
ones issue 7 asks us to compare with: LLaMA-Factory's README hardware table, and the
QLoRA paper (Dettmers et al., arXiv 2305.14314): a 65B model fine-tunes on one 48 GB
GPU, and double quantization saves about 0.37 bits per parameter, about 3 GB at 65B.

    python -m analysis.hardware_table --out results/
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

from analysis.memory_model import GiB, TrainShape, predict
from analysis.method_specs import BUILTIN_METHODS
from analysis.model_shapes import NAMED_MODELS

GB = 1e9
SIZES = {"7B": "llama2_7b", "13B": "llama2_13b", "33B": "llama_33b", "65B": "llama_65b", "70B": "llama2_70b"}
METHODS = {
    "LoRA 16-bit (bf16)": "lora_bf16",
    "QLoRA 8-bit (LLM.int8)": "qlora_int8",
    "QLoRA 4-bit NF4": "qlora_nf4",
    "QLoRA NF4 + DQ": "qlora_nf4_dq",
    "QA-LoRA INT4 (g32)": "qalora_int4",
    "QA-LoRA INT3 (g32)": "qalora_int3",
    "QA-LoRA INT2 (g32)": "qalora_int2",
    "GPTQ INT4 inference (g128)": "gptq_int4",
}
# The training setting the table states: QLoRA's recipe (paged AdamW, gradient
# checkpointing, LoRA r=64 on every linear layer of the blocks) at batch 1 x 512 tokens,
# and a second, larger batch (4 x 1024, the setting of the throughput anchors).
SETTINGS = {
    "b1 s512": TrainShape(1, 512, "paged_adamw_32bit", True),
    "b4 s1024": TrainShape(4, 1024, "paged_adamw_32bit", True),
}
# Per GPU under FSDP (train.strategy=fsdp) across N GPUs, batch 1 x 512 on each (a global batch of N),
# for the methods the harness shards (methods.base.Method.prepare_sharding: LoRA on 16-bit and
# bitsandbytes 4-bit bases; LLM.int8, QA-LoRA and GPTQ are not wired for FSDP).
FSDP_GPUS = (2, 4, 8)
SHARDABLE = ("lora_bf16", "qlora_nf4", "qlora_nf4_dq")
# Answer.AI's FSDP+QLoRA announcement (2024): a 70B model fine-tuned on two 24 GB consumer GPUs.
ANSWER_AI_70B_GPUS, ANSWER_AI_GPU_GB = 2, 24

# LLaMA-Factory README, "Hardware Requirement" (GB; its columns 7B/13B/30B/70B).
LLAMA_FACTORY = {
    "lora_bf16": {"7B": 16, "13B": 32, "33B": 64, "70B": 160},
    "qlora_int8": {"7B": 10, "13B": 20, "33B": 40, "70B": 80},
    "qlora_nf4": {"7B": 6, "13B": 12, "33B": 24, "70B": 48},
    "qlora_nf4_dq": {"7B": 6, "13B": 12, "33B": 24, "70B": 48},
    "qalora_int4": {"7B": 6, "13B": 12, "33B": 24, "70B": 48},
    "qalora_int2": {"7B": 4, "13B": 8, "33B": 16, "70B": 24},
}
QLORA_PAPER_65B_GB = 48  # "finetune a 65B parameter model on a single 48GB GPU"
QLORA_PAPER_DQ_BITS = 0.37  # "reduces the memory footprint by ... approximately 0.37 bits per parameter"


def published(method: str, size: str) -> str:
    if method in LLAMA_FACTORY and size in LLAMA_FACTORY[method]:
        return f"{LLAMA_FACTORY[method][size]} GB (LLaMA-Factory)"
    if size == "65B" and method in ("qlora_nf4", "qlora_nf4_dq"):
        return f"< {QLORA_PAPER_65B_GB} GB (QLoRA paper)"
    return ""


def table_rows() -> list[dict]:
    rows = []
    for size, model in SIZES.items():
        shape = NAMED_MODELS[model]
        for label, method in METHODS.items():
            spec = BUILTIN_METHODS[method]
            row = {"size": size, "model": shape.name, "method": label, "method_key": method}
            for setting, train in SETTINGS.items():
                p = predict(shape, spec, train)
                row[f"peak_device_gb {setting}"] = p["peak_device_bytes"] / GB
                if setting == "b1 s512":
                    parts = p["parts"]
                    row.update(
                        {
                            "bits_per_param": p["weights"]["weight_bits_per_param"],
                            "weights_gb": (
                                parts["frozen_weights"] + parts["quantization_constants"] + parts["unquantized"]
                            )
                            / GB,
                            "quant_constants_gb": parts["quantization_constants"] / GB,
                            "adapters_grads_optimizer_gb": (
                                parts["adapters"] + parts["adapter_gradients"] + parts["optimizer_state"]
                            )
                            / GB,
                            "activations_logits_gb": (p["peak_device_bytes"] - p["floor_device_bytes"]) / GB,
                            "peak_allocated_gib": p["peak_allocated_bytes"] / GiB,
                        }
                    )
            for gpus in FSDP_GPUS:
                per_gpu = predict(shape, spec, replace(SETTINGS["b1 s512"], batch=gpus, shards=gpus))
                needed = max(per_gpu["peak_device_bytes"], per_gpu["load_device_bytes"])  # training or loading
                row[f"fsdp_x{gpus}_gb"] = needed / GB if method in SHARDABLE else "—"
            row["published"] = published(method, size)
            rows.append(row)
    return rows


def dq_saving(size: str) -> tuple[float, float]:
    """(bits/param, GB) that double quantization saves over NF4 for a model size, from the model."""
    shape = NAMED_MODELS[SIZES[size]]
    nf4 = predict(shape, BUILTIN_METHODS["qlora_nf4"])["weights"]
    dq = predict(shape, BUILTIN_METHODS["qlora_nf4_dq"])["weights"]
    return (nf4["weight_bits_per_param"] - dq["weight_bits_per_param"], (nf4["weight_bytes"] - dq["weight_bytes"]) / GB)


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    columns = [
        "size",
        "method",
        "bits_per_param",
        "weights_gb",
        "quant_constants_gb",
        "adapters_grads_optimizer_gb",
        "activations_logits_gb",
        "peak_device_gb b1 s512",
        "peak_device_gb b4 s1024",
        *(f"fsdp_x{gpus}_gb" for gpus in FSDP_GPUS),
        "published",
    ]
    headers = [
        "size",
        "method",
        "bits/param (linears)",
        "weights GB",
        "of which quant. constants GB",
        "adapters + grads + optimizer GB",
        "activations + logits + transients GB",
        "**predicted peak GB** (b1 x 512)",
        "predicted peak GB (b4 x 1024)",
        *(f"per GPU, FSDP x{gpus} GB" for gpus in FSDP_GPUS),
        "published estimate",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = []
        for col in columns:
            value = row[col]
            cells.append(f"{value:.2f}" if col == "bits_per_param" and value else _fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _predict_gb(size: str, method: str, train: TrainShape, **changes) -> dict:
    spec = replace(BUILTIN_METHODS[method], **changes)
    p = predict(NAMED_MODELS[SIZES[size]], spec, train)
    return {"device": p["peak_device_bytes"] / GB, "allocated": p["peak_allocated_bytes"] / GB}


def _under(value: float, limit: float) -> str:
    return "under" if value < limit else "over"


def notes(rows: list[dict]) -> str:
    by = {(r["size"], r["method_key"]): r for r in rows}
    bits65, gb65 = dq_saving("65B")
    small = SETTINGS["b1 s512"]
    peak = lambda size, method: by[(size, method)]["peak_device_gb b1 s512"]  # noqa: E731
    weights = lambda size, method: by[(size, method)]["weights_gb"]  # noqa: E731
    rank8_7b = _predict_gb("7B", "qlora_nf4", small, lora_rank=8)["device"]
    rank8_70b = _predict_gb("70B", "qlora_nf4", small, lora_rank=8)["device"]
    # QLoRA's reference code casts the LoRA modules to bf16 (qlora.py, --bf16), and paged
    # optimizer state may be evicted to CPU memory under pressure: what must stay on the GPU.
    paper_65b = _predict_gb("65B", "qlora_nf4_dq", small, adapter_bytes_per_param=2)
    dq_65b = peak("65B", "qlora_nf4_dq")
    headroom = [LLAMA_FACTORY[m]["7B"] - weights("7B", m) for m in ("lora_bf16", "qlora_int8", "qlora_nf4")]
    return f"""## Notes: where the predictions and the published figures differ, and why

- **Setting.** Training rows: LoRA r=64 on all seven linear layers of every block (the
  QLoRA paper's recipe), fp32 adapters (peft upcasts them), paged AdamW 32-bit, gradient
  checkpointing on, bf16 compute; QA-LoRA with group size 32; GPTQ rows are inference
  (no adapters) with a KV cache for the batch. "Predicted peak" is what the GPU holds:
  `torch.cuda.max_memory_allocated` plus the paged optimizer state, which bitsandbytes
  keeps in CUDA unified memory outside PyTorch's allocator. GB = 10^9 bytes. Not
  included: the CUDA context and kernels (about 0.5-1 GB per process) and the caching
  allocator's reserve above what is allocated (`max_memory_reserved`). 33B is LLaMA-33B
  (LLaMA-Factory's "30B" column; 32.5B parameters).
- **LLaMA-Factory's table** gives no batch size, sequence length, rank or optimizer. Its
  figures follow a rule of thumb of about 2, 1, 0.5 and 0.25 bytes per parameter for
  16-, 8-, 4- and 2-bit bases, rounded up (for 7B: 16/10/6/4 GB against 7 x 2 = 14, 7,
  3.5, 1.75 GB of weights). Our weights alone are {weights("7B", "lora_bf16"):.1f} /
  {weights("7B", "qlora_int8"):.1f} / {weights("7B", "qlora_nf4"):.1f} GB at 7B
  (16-bit, LLM.int8, NF4: embeddings and head stay 16-bit, NF4 adds its absmax), leaving
  {headroom[0]:.1f} / {headroom[1]:.1f} / {headroom[2]:.1f} GB of their figures for adapters, optimizer state and
  activations. At
  r=64 on all layers, adapters + gradients + Adam moments take
  {by[("7B", "qlora_nf4")]["adapters_grads_optimizer_gb"]:.1f} GB, which is why our 7B NF4 prediction
  ({peak("7B", "qlora_nf4"):.1f} GB) is {_under(peak("7B", "qlora_nf4"), 6)} their
  6 GB; at r=8 it is {rank8_7b:.1f} GB. The same holds at 70B: NF4 r=64 {peak("70B", "qlora_nf4"):.1f} GB, r=8
  {rank8_70b:.1f} GB, against their 48 GB.
- **16-bit LoRA**: dominated by 2 bytes per weight (Llama-2-70B has
  {NAMED_MODELS["llama2_70b"].total_params() / 1e9:.1f}B parameters = {weights("70B", "lora_bf16"):.0f} GB; predicted
  peak {peak("70B", "lora_bf16"):.0f} GB vs their 160 GB). At 33B
  their 64 GB is 2 x 30 rounded, below the {weights("33B", "lora_bf16"):.0f} GB that LLaMA-33B's weights alone take.
- **8-bit**: LLM.int8 stores int8 weights plus an fp32 scale per output row (8.01 bits per
  weight), so our 8-bit figures track 1 byte/parameter plus the same adapter and optimizer
  cost as every other trainable row; their 8-bit column is half of the 16-bit column.
- **2-bit**: LLaMA-Factory's "QLoRA 2-bit" row is compared with QA-LoRA INT2, the only
  2-bit trainable base here. With group size 32 its fp16 scale and zero add 32/32 = 1 bit
  per weight (INT2 g32 = 3 bits/param), so our 2-bit figures are above 0.25 bytes/param;
  QA-LoRA's A is r x D_in/32, so its adapters,
  gradients and optimizer state are about half of LoRA's.
- **QLoRA paper, 65B on one 48 GB GPU**: with our setting (fp32 adapters, everything
  counted) NF4 + DQ at batch 1 x 512 is {dq_65b:.1f} GB, {_under(dq_65b, QLORA_PAPER_65B_GB)} 48 GB. The paper's code
  keeps
  the LoRA modules in bf16 and pages the optimizer state (it can be evicted to CPU memory
  when the GPU runs short): with bf16 adapters the GPU must hold {paper_65b["allocated"]:.1f} GB
  allocated ({_under(paper_65b["allocated"], QLORA_PAPER_65B_GB)} 48 GB) plus up to
  {paper_65b["device"] - paper_65b["allocated"]:.1f} GB of pageable optimizer
  state, consistent with the paper's claim. NF4 without DQ: {peak("65B", "qlora_nf4"):.1f} GB in our setting.
- **Double quantization**: from the model, DQ saves {bits65:.3f} bits/parameter on the
  quantized linear layers (4.5 -> 4.127; the paper: about 0.37) and {gb65:.2f} GB at 65B (the
  paper: about 3 GB); only the linear layers are quantized, so the saving is 0.373 bits
  times their {NAMED_MODELS["llama_65b"].block_linear_params() / 1e9:.1f}B weights.
- **FSDP across N GPUs** (per GPU, batch 1 x 512 on each, the rest as above): each GPU holds
  1/N of the weights, adapters, gradients and optimizer state, bitsandbytes' 4-bit constants
  whole (they stay on the module, outside the parameters FSDP shards), its own activations, and
  two decoder blocks gathered whole (the one computing and the one FSDP prefetches). A column is
  the larger of that training peak and what a GPU holds while the model loads: a 16-bit base is
  filled from the first rank's host memory shard by shard, but a bitsandbytes base is quantized
  whole on every GPU before FSDP shards it, so QLoRA never needs less than its whole 4-bit model
  per GPU (Llama-2-70B NF4: {by[("70B", "qlora_nf4")]["fsdp_x8_gb"]:.1f} GB on any number of GPUs). The
  16-bit LoRA baseline of 65B, {peak("65B", "lora_bf16"):.0f} GB on one GPU, needs
  {" / ".join(f"{by[('65B', 'lora_bf16')][f'fsdp_x{n}_gb']:.0f}" for n in FSDP_GPUS)} GB per GPU on
  {" / ".join(map(str, FSDP_GPUS))} GPUs. Answer.AI's FSDP+QLoRA announcement (2024) fine-tuned a 70B
  model on {ANSWER_AI_70B_GPUS} GPUs of {ANSWER_AI_GPU_GB} GB: they load and quantize layer by layer
  (and may offload to CPU memory), which this harness does not, so its
  {by[("70B", "qlora_nf4")]["fsdp_x2_gb"]:.1f} GB per GPU for Llama-2-70B NF4 on 2 GPUs does not fit
  theirs. The sharded training prediction is checked against the per-rank tensor bytes of a
  2-process CPU run (tests/test_fsdp.py).
- **GPTQ INT4 inference**: 4 + 16/128 (fp16 scale) + 4/128 (packed zero) bits per weight
  plus an int32 g_idx per input channel; the issue gives no published figure to compare with.
  Llama-2-70B's grouped-query attention (8 KV heads) makes its KV cache 8x smaller than
  LLaMA-65B's, hence its smaller activation column.
"""


def write_hardware_table(out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows()
    csv_path = out / "hardware_table.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    md_path = out / "hardware_table.md"
    settings = "; ".join(f"{name}: batch {t.batch} x {t.seq_len} tokens" for name, t in SETTINGS.items())
    md_path.write_text(
        "# Predicted GPU memory for fine-tuning, by model size and method\n\n"
        "Generated by `python -m analysis.hardware_table --out results/` "
        "(analysis/memory_model.py, analysis/hardware_table.py); do not edit by hand.\n"
        f"Settings: {settings}; optimizer paged_adamw_32bit, gradient checkpointing, LoRA r=64 "
        "on q,k,v,o,gate,up,down.\n\n" + markdown(rows) + "\n\n" + notes(rows)
    )
    return [md_path, csv_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.hardware_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results", help="folder for hardware_table.{md,csv}")
    args = parser.parse_args(argv)
    for path in write_hardware_table(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
