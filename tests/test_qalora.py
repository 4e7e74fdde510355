"""QA-LoRA: group-pooled adapters, an exact merge into the zero points, an export that reloads."""

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.int_quant import GroupQuantLinear, dequantize, pack_codes, rtn_quantize, unpack_codes
from methods.qalora import QALoRA, QALoRALinear, load_merged, save_merged


def qalora_model(spec, bits, pooling="mean", group_size=32):
    method = QALoRA(
        "qalora",
        bits=bits,
        group_size=group_size,
        pooling=pooling,
        compute_dtype="float32",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
    )
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=torch.device("cpu"))))
    for module in model.modules():  # as if trained: B is no longer zero
        if isinstance(module, QALoRALinear):
            module.qalora_B.data.normal_(0, 0.5)
    return method, model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (48, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)


def test_rtn_error_shrinks_with_more_bits():
    weight = torch.randn(64, 128)
    errors = [(weight - dequantize(*rtn_quantize(weight, b, 32), 32)).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("bits, pooling", [(2, "mean"), (3, "mean"), (4, "mean"), (4, "sum")])
def test_merge_is_exact_and_keeps_integer_codes(tiny_spec, bits, pooling):
    method, model = qalora_model(tiny_spec, bits, pooling)
    tokens = torch.randint(0, tiny_spec.vocab_size, (2, 24))
    with torch.no_grad():
        unmerged = model(tokens).logits
        adapters_off = {id(m): m.base for m in model.modules() if isinstance(m, QALoRALinear)}
        model = method.finalize(model, None)
        merged = model(tokens).logits
    assert not any(isinstance(m, QALoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-3
    layers = [m for m in model.modules() if isinstance(m, GroupQuantLinear)]
    assert len(layers) == len(adapters_off) == 2 * 7
    for layer in layers:
        codes = layer.codes()
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        assert layer.zeros.dtype == torch.float32  # merged zeros are off the integers: kept in fp32


def test_merge_changes_the_zeros_not_the_codes(tiny_spec):
    method, model = qalora_model(tiny_spec, 4)
    before = {n: m.base.packed_codes.clone() for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    zeros_before = {n: m.base.zeros.float().clone() for n, m in model.named_modules() if isinstance(m, QALoRALinear)}
    model = method.finalize(model, None)
    for name, module in model.named_modules():
        if isinstance(module, GroupQuantLinear):
            assert torch.equal(module.packed_codes, before[name])
            assert not torch.equal(module.zeros, zeros_before[name])


def test_exported_merged_model_reloads_with_the_same_outputs(tiny_spec, tmp_path):
    method, model = qalora_model(tiny_spec, 3)
    model = method.finalize(model, None)
    save_merged(model, tmp_path / "export")
    reloaded = load_merged(tmp_path / "export", dtype=torch.float32)
    tokens = torch.randint(0, tiny_spec.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reloaded(tokens).logits)


def test_adapter_shapes_follow_the_groups(tiny_spec):
    _, model = qalora_model(tiny_spec, 4, group_size=32)
    layer = model.model.layers[0].mlp.down_proj  # 256 -> 128
    assert tuple(layer.qalora_A.shape) == (4, 256 // 32) and tuple(layer.qalora_B.shape) == (128, 4)


@pytest.mark.parametrize("bits, group, expected", [(4, 32, 4 + 32 / 32), (4, 128, 4 + 32 / 128), (2, 64, 2 + 32 / 64)])
def test_storage_counts_codes_scales_and_zeros(tiny_spec, bits, group, expected):
    method = QALoRA("qalora", bits=bits, group_size=group, lora={"r": 4})
    model = method.load_base(tiny_spec, LoadContext(device=torch.device("cpu")))
    info = method.describe(model)  # before merging: fp16 scale + fp16 zero per group
    assert info["weight_bits_per_param"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "is not one of 2, 3, 4, 8"),
        ({"group_size": 30}, "multiple of 8"),
        ({"pooling": "max"}, "mean, sum"),
        ({"base_quantizer": "gptq", "calibration": {"n_samples": 2}}, "at least one batch"),
    ],
)
def test_bad_settings_fail_before_any_work(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QALoRA("qalora", **kwargs)


def test_group_size_must_divide_the_layers(tmp_path):
    method = QALoRA("qalora", group_size=128)
    with pytest.raises(ConfigError, match="does not divide"):
        method.validate({"hidden_size": 576, "intermediate_size": 1536})
