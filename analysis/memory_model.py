"""Predict the GPU memory of LoRA/QLoRA-style fine-tuning, part by part, before launching.

The anatomy follows the QLoRA paper (Dettmers et al., arXiv 2305.14314, Section 2 and
Figure 6): frozen quantized weights, their quantization constants, the unquantized parts
(embeddings, norms, output head), the adapters, their gradients, the optimizer state,
activations and logits. Activations follow the per-tensor accounting of Korthikanti et
al. (arXiv 2205.05198), redone for a Llama block with frozen weights, peft LoRA
(fp32 adapters, dropout) and SDPA attention (no s x s matrix is kept).

The weight parts are exact: they reproduce, byte for byte up to rounding of partial
blocks, what methods/storage.py counts from the tensors of a loaded model, so a test can
hold them to 1%. The bytes of a layer are its weight format's (``WeightFormat.layer_bytes``)
and the adapter's tensors and activations the adapter's (``Adapter.tensor_sizes``,
``Adapter.activation_bytes``), as each registers them in methods/ (methods/registry.py): a
format or adapter that declares none is an error naming the member, never another's formula.
The activation, logits and peak figures are a model of what PyTorch's
autograd keeps; they are checked against ``torch.cuda.max_memory_allocated`` by
benchmarks/bench_train.py on a GPU.

    python -m analysis.memory_model --model llama2_7b --method qlora_nf4_dq --batch 1 --seq 512
    python -m analysis.memory_model --model path/to/config.json --method qalora_int4 --gradient-checkpointing
    python -m analysis.hardware_table --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from analysis.method_specs import MethodSpec, resolve_method
from analysis.model_shapes import ModelShape, resolve_shape
from experiments.harness.train import OPTIMIZERS
from methods.registry import adapter_class, weight_format

GiB = 1024**3
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages an optimizer buffer only from this size up
BNB_8BIT_MIN_NUMEL = 4096  # smaller tensors keep 32-bit state in bitsandbytes' 8-bit optimizers
BNB_8BIT_STATE_BLOCK = 256


@dataclass(frozen=True)
class TrainShape:
    batch: int = 1  # the global batch: under FSDP each process computes batch / shards rows of it
    seq_len: int = 512
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    shards: int = 1  # FSDP processes (train.strategy=fsdp, train.nproc): the prediction is per process

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.shards < 1 or self.batch % self.shards:
            raise ValueError(f"batch {self.batch} must split evenly over {self.shards} shard(s)")

    @property
    def tokens(self) -> int:
        """Tokens one process computes on."""
        return self.batch // self.shards * self.seq_len


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- weights (exact)


def _quantized_linears(shape: ModelShape, method: MethodSpec) -> list[tuple[int, int]]:
    """(in, out) of every linear layer stored in the method's weight format.

    A quantized format stores every linear layer of the blocks (lm_head is skipped); for a dense
    (16-bit) base storage.py counts the method's targets as "the" linear layers.
    """
    per_block = shape.block_linears()
    if weight_format(method.weight_format).dense:
        per_block = {k: v for k, v in per_block.items() if k in method.lora_targets}
    return [dims for _ in range(shape.num_layers) for dims in per_block.values()]


def unquantized_bytes(shape: ModelShape, method: MethodSpec) -> int:
    """Embeddings, norms, lm_head (never quantized here), rotary buffers, and 16-bit non-target linears."""
    c = method.compute_bytes
    embeddings = shape.vocab * shape.hidden * c * (1 if shape.tied_embeddings else 2)
    norms = (2 * shape.num_layers + 1) * shape.hidden * c
    rotary = 2 * (shape.head_dim // 2) * 4  # inv_freq and original_inv_freq, fp32 buffers
    other_linears = 0
    if weight_format(method.weight_format).dense:
        other_linears = (
            shape.num_layers
            * sum(
                d_in * d_out for name, (d_in, d_out) in shape.block_linears().items() if name not in method.lora_targets
            )
            * method.bits
            // 8
        )
    return embeddings + norms + rotary + other_linears


def adapter_tensor_sizes(shape: ModelShape, method: MethodSpec) -> tuple[list[int], list[int]]:
    """(trained, frozen) element counts of the adapter's tensors, as its registered class declares them."""
    return adapter_class(method.adapter).tensor_sizes(shape, method)


def adapter_params(shape: ModelShape, method: MethodSpec) -> tuple[int, int]:
    """(parameters, tensors) the adapter trains: LoRA's A (r x D_in; QA-LoRA: r x D_in/L) and B (D_out x r),
    with DoRA a magnitude of D_out; a prompt adapter's prompts."""
    trained, _ = adapter_tensor_sizes(shape, method)
    return sum(trained), len(trained)


def weight_parts(shape: ModelShape, method: MethodSpec) -> dict:
    """The same keys as methods.storage.weight_storage, predicted from the shapes."""
    fmt = weight_format(method.weight_format)
    code_bytes = constant_bytes = params = 0
    for d_in, d_out in _quantized_linears(shape, method):
        codes, constants = fmt.layer_bytes(d_in, d_out, method)
        code_bytes, constant_bytes, params = code_bytes + codes, constant_bytes + constants, params + d_in * d_out
    constant_bytes += fmt.code_table_bytes(method)
    linear_bytes = code_bytes + constant_bytes
    other = unquantized_bytes(shape, method)
    trained, frozen = adapter_tensor_sizes(shape, method)
    return {
        "weight_bytes": linear_bytes + other,
        "quantized_linear_params": params,
        "quantized_linear_bytes": linear_bytes,
        "quantization_constant_bytes": constant_bytes,
        "unquantized_bytes": other,
        # frozen adapter tensors (VeRA's shared random matrices) are adapter bytes too, as storage counts them
        "adapter_bytes": (sum(trained) + sum(frozen)) * method.adapter_bytes_per_param,
        "weight_bits_per_param": 8 * linear_bytes / params if params else None,
        "trainable_params": sum(trained),
    }


# ---------------------------------------------------------------- optimizer (exact)


def optimizer_parts(shape: ModelShape, method: MethodSpec, optimizer: str) -> dict:
    """Optimizer state bytes, and how much of it lives outside PyTorch's allocator (paged).

    torch AdamW: exp_avg + exp_avg_sq in the parameter dtype (fp32) and a fp32 ``step``
    tensor per parameter. bitsandbytes' paged optimizers keep the same fp32 state in CUDA
    unified memory (not seen by ``max_memory_allocated``) for tensors of 1e5 elements or
    more; its 8-bit optimizers keep uint8 state with an fp32 absmax per 256 values, plus
    two 256-entry fp32 code maps shared by all tensors.
    """
    if not method.trainable:
        return {"optimizer_state_bytes": 0, "optimizer_paged_bytes": 0}
    per_tensor, _ = adapter_tensor_sizes(shape, method)
    total = paged = 0
    for numel in per_tensor:
        if optimizer == "adamw_torch":
            total += 2 * numel * method.adapter_bytes_per_param + 4
            continue
        eight_bit = optimizer.endswith("8bit") and numel >= BNB_8BIT_MIN_NUMEL
        size = 2 * (numel + 4 * ceil_div(numel, BNB_8BIT_STATE_BLOCK)) if eight_bit else 2 * 4 * numel
        total += size
        if optimizer.startswith("paged") and numel >= PAGED_MIN_NUMEL:
            paged += 2 * numel * (1 if eight_bit else 4)
    if optimizer.endswith("8bit"):
        total += 2 * 256 * 4
    return {"optimizer_state_bytes": total, "optimizer_paged_bytes": paged}


# ---------------------------------------------------------------- activations (modelled)


def layer_activation_bytes(shape: ModelShape, method: MethodSpec, tokens: int, cuda: bool = True) -> int:
    """Bytes autograd keeps for backward in one decoder block (frozen base, LoRA on targets).

    RMSNorm upcasts to fp32 and keeps that copy and 1/rms (x2 norms). SDPA keeps q, k, v,
    its output and the fp32 log-sum-exp per head. SwiGLU keeps gate, silu(gate) and up.
    A frozen linear keeps nothing but its weight (already counted; bitsandbytes' MatMul4Bit
    saves the packed weight only). What the adapter's layers keep is the adapter's
    ``activation_bytes`` (peft LoRA: its fp32 input, the dropout mask, A's output; the mask is
    a bool from CUDA's fused dropout, and on CPU one in the input's dtype: ``cuda=False``, used
    by the CPU test that checks this function against autograd).
    """
    c, t, h = method.compute_bytes, tokens, shape.hidden
    norms = 2 * (4 * t * h + 4 * t)
    attention = t * (2 * shape.q_dim + 2 * shape.kv_dim) * c + 4 * t * shape.heads
    mlp = 3 * t * shape.intermediate * c
    adapter = adapter_class(method.adapter).activation_bytes(shape, method, tokens, cuda)
    return norms + attention + mlp + adapter


def activation_parts(shape: ModelShape, method: MethodSpec, train: TrainShape) -> dict:
    """Kept activations over the whole model, with or without gradient checkpointing, and logits."""
    t, c = train.tokens, method.compute_bytes
    per_layer = layer_activation_bytes(shape, method, t)
    final_norm = 4 * t * shape.hidden + 4 * t
    rotary = 2 * t * shape.head_dim * c  # cos and sin, shared by all layers
    if train.gradient_checkpointing:
        # transformers checkpoints each decoder layer: only its input is kept; in backward
        # one layer at a time is recomputed, so one layer's activations come back.
        kept = shape.num_layers * t * shape.hidden * c + final_norm + rotary
        recomputed = per_layer
    else:
        kept = shape.num_layers * per_layer + final_norm + rotary
        recomputed = 0
    # Loss: transformers upcasts the logits to fp32 and log_softmax keeps its fp32 output;
    # at that moment the compute-dtype logits, the fp32 copy and the log-probs coexist.
    logits_peak = t * shape.vocab * (c + 4 + 4)
    logits_kept = t * shape.vocab * 4
    return {
        "activation_bytes": kept,
        "recomputed_layer_bytes": recomputed,
        "logits_bytes": logits_peak,
        "logits_kept_bytes": logits_kept,
    }


def _transient_bytes(shape: ModelShape, method: MethodSpec, tokens: int) -> int:
    """Short-lived buffers of the backward pass: the largest dequantized weight, and the
    gradient of the widest activation with the fp32 copy the LoRA branch makes of it."""
    widest = max(shape.intermediate, shape.hidden, shape.q_dim)
    dequantized = 0
    if not weight_format(method.weight_format).dense:
        dequantized = max(d_in * d_out for d_in, d_out in shape.block_linears().values()) * method.compute_bytes
    return dequantized + tokens * widest * (method.compute_bytes + 4)


# ---------------------------------------------------------------- the whole prediction


def sharded_parts(shape: ModelShape, weights: dict, optimizer: dict, shards: int) -> dict:
    """One process's share under FSDP: 1/N of every parameter (frozen weights, adapters), of the
    gradients and of the optimizer state (FSDP2 pads each parameter's first dimension to a multiple
    of N: a few rows at most); bitsandbytes' 4-bit constants whole on every process (they live on
    the module, not in the parameter FSDP shards); and, while a decoder block computes, its
    parameters gathered whole, with the next block's, which FSDP prefetches."""
    constants = weights["quantization_constant_bytes"]
    block = (weights["quantized_linear_bytes"] - constants + weights["adapter_bytes"]) // shape.num_layers
    return {
        "weight_bytes": ceil_div(weights["weight_bytes"] - constants, shards) + constants,
        "quantized_linear_bytes": ceil_div(weights["quantized_linear_bytes"] - constants, shards) + constants,
        "quantization_constant_bytes": constants,
        "unquantized_bytes": ceil_div(weights["unquantized_bytes"], shards),
        "adapter_bytes": ceil_div(weights["adapter_bytes"], shards),
        "trainable_params": ceil_div(weights["trainable_params"], shards),
        "optimizer_state_bytes": ceil_div(optimizer["optimizer_state_bytes"], shards),
        "optimizer_paged_bytes": ceil_div(optimizer["optimizer_paged_bytes"], shards),
        "gathered_blocks": 2 * block if shards > 1 else 0,
    }


def predict(shape: ModelShape, method: MethodSpec, train: TrainShape | None = None) -> dict:
    """Every part of training (or, for methods without adapters, inference) memory, in bytes; per process
    when ``train.shards`` > 1 (FSDP)."""
    train = train or TrainShape()
    whole = weight_parts(shape, method)
    mine = sharded_parts(shape, whole, optimizer_parts(shape, method, train.optimizer), train.shards)
    # per process where sharded; trainable_params stays the whole count, as the record's
    weights = {**whole, **{key: mine[key] for key in whole if key in mine and key != "trainable_params"}}
    optimizer = {key: mine[key] for key in ("optimizer_state_bytes", "optimizer_paged_bytes")}
    gradients = mine["trainable_params"] * method.adapter_bytes_per_param
    acts = activation_parts(shape, method, train)
    transient = _transient_bytes(shape, method, train.tokens)
    static = weights["weight_bytes"] + weights["adapter_bytes"] + mine["gathered_blocks"]
    on_allocator = optimizer["optimizer_state_bytes"] - optimizer["optimizer_paged_bytes"]
    if method.trainable:
        # Peak: at the loss (all activations + logits), or late in backward (gradients
        # nearly all there, one layer recomputed), or in the optimizer step (gradients + the
        # foreach AdamW's fp32 temporaries, about one more fp32 per parameter).
        at_loss = acts["activation_bytes"] + acts["logits_bytes"]
        late_backward = gradients + acts["recomputed_layer_bytes"] + acts["logits_kept_bytes"] + transient
        in_step = gradients + (gradients if train.optimizer == "adamw_torch" else 0)
        dynamic = max(at_loss, late_backward, in_step)
        kv_cache = 0
    else:
        # Inference over the batch: a KV cache in the compute dtype, one layer's working
        # set and the last position's logits (generation) or all logits (scoring).
        kv_cache = 2 * shape.num_layers * train.tokens * shape.kv_dim * method.compute_bytes
        # no autograd: nothing is kept for a backward pass
        acts = {
            **acts,
            "activation_bytes": 0,
            "recomputed_layer_bytes": 0,
            "logits_bytes": train.tokens * shape.vocab * (method.compute_bytes + 4),
        }
        dynamic = kv_cache + transient + acts["logits_bytes"]
    peak_allocated = static + on_allocator + dynamic
    return {
        "model": shape.name,
        "method": method.name,
        **asdict(train),
        "parts": {
            "frozen_weights": weights["quantized_linear_bytes"] - weights["quantization_constant_bytes"],
            "quantization_constants": weights["quantization_constant_bytes"],
            "unquantized": weights["unquantized_bytes"],
            "adapters": weights["adapter_bytes"],
            "adapter_gradients": gradients,
            "optimizer_state": optimizer["optimizer_state_bytes"],
            "activations": acts["activation_bytes"],
            "recomputed_layer": acts["recomputed_layer_bytes"],
            "logits": acts["logits_bytes"],
            "kv_cache": kv_cache,
            "transient": transient,
            "gathered_blocks": mine["gathered_blocks"],
        },
        "weights": weights,
        "optimizer_paged_bytes": optimizer["optimizer_paged_bytes"],
        # the floor: what must be resident whatever the activations (weights, adapters,
        # their gradients, optimizer state); "allocated" leaves paged optimizer state out
        "floor_allocated_bytes": static + gradients + on_allocator,
        "floor_device_bytes": static + gradients + optimizer["optimizer_state_bytes"],
        "peak_allocated_bytes": peak_allocated,
        # paged optimizer state lives in CUDA unified memory: on the GPU while it fits,
        # invisible to torch.cuda.max_memory_allocated
        "peak_device_bytes": peak_allocated + optimizer["optimizer_paged_bytes"],
        "load_device_bytes": load_device_bytes(shape, method, whole, mine, train.shards),
    }


def load_device_bytes(shape: ModelShape, method: MethodSpec, whole: dict, mine: dict, shards: int) -> int:
    """What one GPU holds while the model loads (experiments/distribution/topology.py). Sharded, a 16-bit
    base is built on the meta device and each rank receives its shards from rank 0's host copy one tensor at a time: its
    shards and the largest tensor whole (an embedding). A bitsandbytes base quantizes as it loads, so
    every rank holds the whole quantized base and its adapters until FSDP shards them."""
    if shards == 1 or not weight_format(method.weight_format).dense:
        return whole["weight_bytes"] + whole["adapter_bytes"]
    largest = shape.vocab * shape.hidden * method.compute_bytes
    return mine["weight_bytes"] + mine["adapter_bytes"] + largest


def predict_named(model: str, method: str, train: TrainShape | None = None, rank: int | None = None) -> dict:
    spec = resolve_method(method)
    if rank is not None and spec.lora_rank is not None:
        spec = spec.with_lora(rank=rank)
    return predict(resolve_shape(model), spec, train)


def format_prediction(prediction: dict) -> str:
    rows = [
        f"{prediction['model']} / {prediction['method']}: batch {prediction['batch']} x seq "
        f"{prediction['seq_len']}, optimizer {prediction['optimizer']}, gradient checkpointing "
        f"{'on' if prediction['gradient_checkpointing'] else 'off'}"
        + (f"; per process of {prediction['shards']} under FSDP" if prediction["shards"] > 1 else "")
    ]
    for part, value in prediction["parts"].items():
        rows.append(f"  {part:<24}{value / GiB:>10.3f} GiB")
    bits = prediction["weights"]["weight_bits_per_param"]
    rows.append(f"  {'bits/param (linears)':<24}{bits:>10.3f}" if bits else "")
    rows.append(f"  {'floor (allocated)':<24}{prediction['floor_allocated_bytes'] / GiB:>10.3f} GiB")
    rows.append(f"  {'peak allocated':<24}{prediction['peak_allocated_bytes'] / GiB:>10.3f} GiB")
    if prediction["optimizer_paged_bytes"]:
        rows.append(
            f"  {'+ paged optimizer state':<24}{prediction['optimizer_paged_bytes'] / GiB:>10.3f} GiB"
            " (unified memory, not in max_memory_allocated)"
        )
    if prediction["shards"] > 1:
        rows.append(f"  {'while loading':<24}{prediction['load_device_bytes'] / GiB:>10.3f} GiB")
    return "\n".join(r for r in rows if r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.memory_model", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="llama2_7b",
        help="named model (llama2_7b/13b/70b, llama_33b/65b, synthetic_<preset>, smollm2_135m), "
        "a config.json path, or a Hub id",
    )
    parser.add_argument("--method", default="qlora_nf4_dq", help="conf/method name, built-in name, or YAML path")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the method's)")
    parser.add_argument("--optimizer", default="adamw_torch", choices=OPTIMIZERS)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--shards", type=int, default=1, help="FSDP processes (train.nproc): memory per process")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    args = parser.parse_args(argv)
    try:
        train = TrainShape(args.batch, args.seq, args.optimizer, args.gradient_checkpointing, args.shards)
        prediction = predict_named(args.model, args.method, train, args.rank)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(prediction, indent=2) if args.json else format_prediction(prediction))
    return 0


if __name__ == "__main__":
    sys.exit(main())
