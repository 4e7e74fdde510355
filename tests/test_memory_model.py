"""The memory model against the exact tensor bytes of real runs on CPU (issue 7: within 1%).

Each case loads a real model through a harness method (conf/method/<name>.yaml, Hydra
compose), counts its storage from the tensors (methods/storage.py via ``describe``),
runs one optimizer step to create the optimizer state, and compares every part with
``analysis.memory_model``'s prediction from the model's config.json alone.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from analysis.memory_model import TrainShape, layer_activation_bytes, main, predict, weight_parts
from analysis.method_specs import resolve_method
from analysis.model_shapes import NAMED_MODELS, resolve_shape
from experiments.harness.measure import optimizer_state_bytes
from experiments.harness.models import resolve_model
from experiments.harness.train import TrainSettings, make_optimizer
from methods.base import LoadContext
from tests.conftest import CONF, compose_config

# QLoRA's formats and the adapters on 16-bit and NF4 bases, plus the INT-k group format of QA-LoRA and RTN
METHODS = ("lora_bf16", "qlora_nf4", "qlora_nf4_dq", "qlora_fp4", "qlora_int8") + tuple(
    m for m in ("qalora", "rtn") if (CONF / "method" / f"{m}.yaml").exists()
)
# The other adapters, on the tiny preset (their storage is LoRA's or a prompt's, whatever the base).
ADAPTERS = ("dora_bf16", "loftq_nf4", "prefix_bf16", "prefix_nf4", "llama_adapter_bf16", "llama_adapter_nf4")
MODELS = {
    "tiny": {"name": "llama_synthetic", "kind": "synthetic", "preset": "tiny"},
    "small": {"name": "llama_synthetic", "kind": "synthetic", "preset": "small"},
    "smollm2": {"name": "smollm2_135m", "kind": "bundled_gguf"},
}
# describe() key -> what it is; all are exact byte (or parameter) counts
COMPARED = (
    "weight_bytes",
    "quantized_linear_bytes",
    "quantization_constant_bytes",
    "unquantized_bytes",
    "adapter_bytes",
    "trainable_params",
)
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def specs():
    return {key: resolve_model(OmegaConf.create(cfg)) for key, cfg in MODELS.items()}


def one_step_optimizer_bytes(model) -> int:
    """Optimizer state after one optimizer step of the harness's optimizer (torch AdamW).

    The state's size depends on the parameters only, not on the gradients' values, so the
    step runs on zero gradients: no forward pass needed, which keeps the test fast.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(TrainSettings(optimizer="adamw_torch"), params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer_state_bytes(optimizer)


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured else abs(predicted)


# Every method on the synthetic presets; on the bundled SmolLM2 (135M parameters, slower
# to quantize on CPU) the 16-bit base and NF4 with and without double quantization.
# (FP4 stores exactly what NF4 stores, only its 16-entry code table differs.)
CASES = (
    [(model, method) for model in ("tiny", "small") for method in METHODS]
    + [("smollm2", method) for method in ("lora_bf16", "qlora_nf4", "qlora_nf4_dq")]
    + [("tiny", method) for method in ADAPTERS]
)


@pytest.mark.parametrize(("model_key", "method_name"), CASES)
def test_static_parts_match_tensor_bytes(model_key, method_name, specs):
    spec = specs[model_key]
    method = instantiate(compose_config(f"method={method_name}").method, _convert_="all")
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu"))))
    measured = method.describe(model)
    measured["optimizer_state_bytes"] = one_step_optimizer_bytes(model) if method.trainable else 0

    shape = resolve_shape(spec.path)  # from the checkpoint's config.json only
    prediction = predict(shape, resolve_method(method_name), TrainShape(optimizer="adamw_torch"))
    predicted = {**prediction["weights"], "optimizer_state_bytes": prediction["parts"]["optimizer_state"]}
    errors = {
        key: relative_error(predicted[key], measured[key])
        for key in (*COMPARED, "optimizer_state_bytes")
        if measured[key] or predicted[key]
    }
    assert max(errors.values()) <= TOLERANCE, {k: (predicted[k], measured[k]) for k in errors}
    assert predicted["weight_bits_per_param"] == pytest.approx(measured["weight_bits_per_param"], rel=TOLERANCE)


def test_llama2_7b_format_arithmetic():
    """The formats' bits/param at 7B (DESIGN.md), and QLoRA's ~0.37 bits saved by double quantization."""
    shape = NAMED_MODELS["llama2_7b"]
    bits = {
        name: weight_parts(shape, resolve_method(name))["weight_bits_per_param"]
        for name in ("lora_bf16", "qlora_nf4", "qlora_nf4_dq", "qlora_int8", "qalora_int4", "gptq_int4")
    }
    assert bits["lora_bf16"] == 16
    assert bits["qlora_nf4"] == pytest.approx(4.5, abs=1e-4)
    assert bits["qlora_nf4_dq"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert bits["qlora_nf4"] - bits["qlora_nf4_dq"] == pytest.approx(0.373, abs=0.001)
    assert bits["qlora_int8"] == pytest.approx(8 + 32 / 4096 * (2 / 3) + 32 / 11008 * (1 / 3), rel=0.01)
    assert bits["qalora_int4"] == pytest.approx(4 + 32 / 32, abs=1e-6)
    assert bits["gptq_int4"] == pytest.approx(4 + 16 / 128 + 4 / 128, abs=0.01)


def test_synthetic_names_and_config_files_agree(specs):
    from_file = resolve_shape(specs["tiny"].path)
    assert resolve_shape("synthetic_tiny") == replace(from_file, name="synthetic-tiny")


def test_gradient_checkpointing_keeps_less():
    shape, method = NAMED_MODELS["llama2_7b"], resolve_method("qlora_nf4_dq")
    full = predict(shape, method, TrainShape(1, 512))
    ckpt = predict(shape, method, TrainShape(1, 512, gradient_checkpointing=True))
    assert ckpt["parts"]["activations"] < full["parts"]["activations"] / 10
    assert ckpt["peak_allocated_bytes"] < full["peak_allocated_bytes"]


def test_saved_activations_of_one_block_match_autograd(specs):
    """The activation model against what autograd really saves for one decoder block (lora_bf16, CPU)."""
    method = instantiate(compose_config("method=lora_bf16").method, _convert_="all")
    model = method.add_adapters(method.load_base(specs["small"], LoadContext(device=torch.device("cpu"))))
    model.train()
    block = model.base_model.model.model.layers[0]
    rotary = model.base_model.model.model.rotary_emb
    batch, seq = 2, 64
    hidden = torch.randn(batch, seq, 512, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    cos_sin = rotary(hidden, positions)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != hidden.untyped_storage().data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden, position_embeddings=cos_sin, position_ids=positions)
    shape = resolve_shape(specs["small"].path)
    measured = sum(storages.values()) - 2 * batch * seq * shape.head_dim * 2  # cos/sin: counted once per model
    predicted = layer_activation_bytes(shape, resolve_method("lora_bf16"), batch * seq, cuda=False)
    assert predicted == pytest.approx(measured, rel=0.01), (predicted, measured)


def test_cli_prints_every_part(capsys):
    assert main(["--model", "llama2_13b", "--method", "qlora_nf4_dq", "--batch", "1", "--seq", "512"]) == 0
    out = capsys.readouterr().out
    for part in (
        "frozen_weights",
        "quantization_constants",
        "unquantized",
        "adapters",
        "adapter_gradients",
        "optimizer_state",
        "activations",
        "logits",
        "peak allocated",
    ):
        assert part in out
    assert main(["--model", "no_such_model", "--method", "qlora_nf4"]) == 2


def test_sharded_loading_needs_the_whole_4bit_base_per_gpu_but_only_shards_of_a_16bit_one():
    """What experiments/run.py does when a sharded run loads: a bitsandbytes base is quantized whole on
    every GPU before FSDP shards it; a 16-bit base arrives from rank 0's host memory shard by shard."""
    from analysis.memory_model import TrainShape, predict_named

    for method in ("qlora_nf4", "qlora_nf4_dq"):
        one = predict_named("llama2_70b", method)
        eight = predict_named("llama2_70b", method, TrainShape(8, 512, "paged_adamw_32bit", True, shards=8))
        whole = one["weights"]["weight_bytes"] + one["weights"]["adapter_bytes"]
        assert eight["load_device_bytes"] == whole > eight["peak_device_bytes"]  # loading is the peak
    one = predict_named("llama_65b", "lora_bf16")
    four = predict_named("llama_65b", "lora_bf16", TrainShape(4, 512, "paged_adamw_32bit", True, shards=4))
    assert four["load_device_bytes"] < four["peak_device_bytes"] < one["weights"]["weight_bytes"] / 3
