"""torchao's bases (methods/torchao_quant.py): its NF4 against bitsandbytes', bytes exact, merges, refusals."""

from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build

pytest.importorskip("torchao", reason="the torchao bases need the [torchao] extra")


@pytest.fixture(scope="module")
def smollm2_down_proj(smollm2_spec):
    from safetensors import safe_open

    [shard] = sorted(Path(smollm2_spec.path).glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as tensors:
        return tensors.get_tensor("model.layers.3.mlp.down_proj.weight").to(torch.bfloat16)


def test_torchaos_nf4_is_bitsandbytes_nf4_up_to_its_bf16_table_and_int8_scales(smollm2_down_proj):
    """The same weights through both: the same code for all but a few weights, each of those one step away
    (a weight near the midpoint of two NF4 values, which torchao's bf16 table and int8-quantized scales move
    across), the same block scales within the int8 double quantization's step, the same error."""
    import bitsandbytes as bnb
    from torchao.quantization import to_nf4

    weight = smollm2_down_proj
    ours = to_nf4(weight, block_size=64, scaler_block_size=256)
    packed, state = bnb.functional.quantize_4bit(weight.float(), blocksize=64, quant_type="nf4")

    def codes(packed_bytes):
        flat = packed_bytes.flatten()
        return torch.stack([(flat >> 4) & 15, flat & 15], 1).flatten().to(torch.int64)

    theirs_codes, ours_codes = codes(packed), codes(ours.quantized_data)
    differ = theirs_codes != ours_codes
    assert differ.float().mean() < 0.01
    assert (theirs_codes[differ] - ours_codes[differ]).abs().max() == 1
    torch.testing.assert_close(ours.nf4.float(), state.code.float(), atol=2e-3, rtol=0)  # the table, in bf16
    scales = ours.dequantize_scalers(ours.quantized_scalers, ours.quantization_factor, ours.scaler_block_size)
    # torchao stores each scale as int8 steps of max|scale - mean| / 127 about their mean, then in bf16
    step = (state.absmax - state.absmax.mean()).abs().max() / 127
    assert (scales.float() - state.absmax).abs().max() <= step
    errors = [
        (dense.float() - weight.float()).pow(2).mean()
        for dense in (ours.get_original_weight(), bnb.functional.dequantize_4bit(packed, state))
    ]
    assert errors[0] == pytest.approx(errors[1].item(), rel=0.05)


@pytest.mark.parametrize("base", ["torchao_int8", "torchao_nf4"])
def test_stored_bytes_are_counted_from_torchaos_tensors_and_predicted(base, tiny_spec, cpu):
    from analysis.method_specs import MethodSpec
    from methods.torchao_quant import TorchAOWeights, _torchao_weight

    method = build(base, "none", compute_dtype="bfloat16")
    model = method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec))
    record = method.describe(model)
    shapes = [tuple(_torchao_weight(m).shape) for m in model.modules() if TorchAOWeights.holds(m)]
    assert len(shapes) == 14 and record["quantized_linear_params"] == sum(o * i for o, i in shapes)
    fmt = method.method_format()
    spec = MethodSpec(base, fmt.weight_format, fmt.bits, fmt.block_size, lora_rank=None)
    predicted = sum(sum(TorchAOWeights.layer_bytes(d_in, d_out, spec)) for d_out, d_in in shapes)
    assert record["quantized_linear_bytes"] == predicted + TorchAOWeights.code_table_bytes(spec)
    expected_bits = {"torchao_int8": 8, "torchao_nf4": 4}[base]
    assert expected_bits < record["weight_bits_per_param"] < expected_bits + 0.5


@pytest.mark.parametrize("base", ["torchao_int8", "torchao_nf4"])
def test_lora_on_torchao_trains_and_merges_into_plain_weights_with_its_logits(base, tiny_spec, cpu):
    from methods.merge import load_merged_weights, merged_weights
    from tests.conftest import train_losses

    method = build(base, "lora", compute_dtype="float32", lora={"r": 4})
    assert method.name == f"qlora_{base}"
    context = LoadContext(cpu, model_spec=tiny_spec)
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, context))
    losses = train_losses(model, steps=4)
    assert losses[-1] < losses[0]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = build("fp32", "none").load_base(tiny_spec, context).eval()
    load_merged_weights(plain, merged_weights(model, torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=2e-4, rtol=2e-4
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is a CPU machine's")
def test_int4_on_a_machine_without_a_gpu_is_refused_before_any_work_naming_what_runs():
    method = build("torchao_int4", "lora")
    with pytest.raises(ConfigError, match="torchao_int4 needs a CUDA GPU: .* on CPU use method.base=hqq or rtn"):
        method.validate({"hidden_size": 576, "intermediate_size": 1536})


@pytest.mark.parametrize(
    "base, adapter, reason", [("torchao_nf4", "dora", "NF4Tensor"), ("torchao_int8", "vera", "VeRA")]
)
def test_pairs_peft_cannot_train_are_refused_in_one_line(base, adapter, reason):
    with pytest.raises(ConfigError, match=reason):
        build(base, adapter)
