"""The hqq base (methods/hqq_quant.py): better than round-to-nearest, bytes exact, merges, refuses bad input."""

from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build

pytest.importorskip("hqq", reason="the hqq base needs the [hqq] extra")


@pytest.fixture(scope="module")
def smollm2_down_proj(smollm2_spec):
    """One real weight (layer 3's down_proj, 576 x 1536) of the bundled SmolLM2-135M, in float32."""
    from safetensors import safe_open

    [shard] = sorted(Path(smollm2_spec.path).glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as tensors:
        return tensors.get_tensor("model.layers.3.mlp.down_proj.weight").float()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_hqq_weight_error_is_below_round_to_nearest_at_the_same_bits_and_group(bits, group_size, smollm2_down_proj):
    from methods.hqq_quant import quantize_linears_hqq
    from methods.int_quant import dequantize, rtn_quantize

    weight = smollm2_down_proj
    model = torch.nn.Sequential()
    model.add_module("down_proj", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model.down_proj.weight.data.copy_(weight)
    quantize_linears_hqq(model, ("down_proj",), bits, group_size, torch.float32)
    hqq_error = (model.down_proj.dequantize().float() - weight).pow(2).mean()
    codes, scales, zeros = rtn_quantize(weight, bits, group_size)
    rtn_error = (dequantize(codes, scales, zeros, group_size) - weight).pow(2).mean()
    assert hqq_error < rtn_error, (hqq_error.item(), rtn_error.item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stored_bytes_are_counted_from_the_tensors_the_same_on_both_cpu_paths_and_predicted(bits, tiny_spec, cpu):
    """k bits of code per weight (3 bits: 10 codes per int32, groups padded to 10) and a 16-bit scale and zero
    per group of 32, on either CPU path (float32 compute stores the same 16-bit scales; the embeddings are in the
    compute dtype, as on every base), as the memory model says."""
    from analysis.method_specs import MethodSpec
    from methods.hqq_quant import HqqGroups

    described = {}
    for compute_dtype in ("bfloat16", "float32"):
        method = build("hqq", "none", bits=bits, group_size=32, compute_dtype=compute_dtype)
        model = method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec))
        quantized = ("quantized_linear_params", "quantized_linear_bytes", "quantization_constant_bytes")
        described[compute_dtype] = {key: method.describe(model)[key] for key in (*quantized, "weight_bits_per_param")}
    record = described["bfloat16"]
    assert described["float32"] == record
    layers = [module.meta["shape"] for module in model.modules() if HqqGroups.holds(module)]
    params = sum(shape.numel() for shape in layers)
    assert record["quantized_linear_params"] == params
    constants = params // 32 * 2 * 2
    assert record["quantization_constant_bytes"] == constants
    if bits != 3:
        assert record["quantized_linear_bytes"] == params * bits // 8 + constants
    spec = MethodSpec("hqq", "hqq", bits, 32, lora_rank=None)
    predicted = sum(sum(HqqGroups.layer_bytes(d_in, d_out, spec)) for d_out, d_in in layers)
    assert record["quantized_linear_bytes"] == predicted


def test_lora_on_hqq_merges_into_plain_weights_that_compute_what_the_quantized_model_does(tiny_spec, cpu):
    from methods.merge import load_merged_weights, merged_weights
    from tests.conftest import train_losses

    method = build("hqq", "lora", bits=4, group_size=32, compute_dtype="float32", lora={"r": 4})
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    losses = train_losses(model, steps=4)
    assert losses[-1] < losses[0]  # it trains
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    plain = build("fp32", "none").load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec))
    load_merged_weights(plain, merged_weights(model, torch.float32))
    plain.eval()
    with torch.no_grad():
        merged = plain(input_ids=batch).logits
    torch.testing.assert_close(merged, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bits": 5}, "method.bits=5 is not one HQQ takes: 2, 3, 4, 8"),
        ({"group_size": 30}, "method.group_size=30: must be a positive multiple of 8"),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_valid_choices(settings, message):
    with pytest.raises(ConfigError, match=message):
        build("hqq", "lora", **settings)


def test_a_group_size_that_does_not_divide_the_inputs_fails_before_any_work():
    method = build("hqq", "lora", group_size=256)
    with pytest.raises(ConfigError, match="group_size=256 does not divide the model's hidden_size"):
        method.validate({"hidden_size": 576, "intermediate_size": 1536})


def test_without_the_extra_the_error_names_it(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"method.base=hqq needs the hqq package: pip install -e '.\[hqq\]'"):
        build("hqq", "lora")
