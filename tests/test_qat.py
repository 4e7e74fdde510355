"""Quantization-aware LoRA (methods/qat.py): trained through q(W + sBA), converted to exactly that INT-k model."""

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build
from methods.int_quant import GroupQuantLinear, dequantize, rtn_quantize
from methods.qat import QatLoRALinear
from methods.settings import LoraSettings


def _layer(dropout: float = 0.0) -> QatLoRALinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True)
    layer = QatLoRALinear(base, LoraSettings(r=4, alpha=8, dropout=dropout), bits=4, group_size=32)
    torch.nn.init.normal_(layer.lora_B, std=0.05)  # a trained-looking adapter, not B = 0
    return layer


def test_the_layer_computes_with_the_merged_weight_rounded_and_the_conversion_ships_exactly_that():
    layer = _layer(dropout=0.1).eval()
    x = torch.randn(3, 5, 64)
    merged = layer.base.weight.detach() + layer.scaling * (layer.lora_B @ layer.lora_A).detach()
    rounded = dequantize(*rtn_quantize(merged, 4, 32), 32)
    assert (rounded != merged).float().mean() > 0.9  # the rounding is real
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ rounded.T + layer.base.bias, atol=1e-5, rtol=0)
        converted = layer.converted()
        assert isinstance(converted, GroupQuantLinear) and converted.bits == 4
        torch.testing.assert_close(converted(x), layer(x), atol=1e-6, rtol=0)


def test_gradients_of_a_and_b_pass_straight_through_the_rounding_as_loras_and_the_inputs_through_w_q():
    layer = _layer()
    x = torch.randn(6, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    qat = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), x.grad.clone())

    # the same layer with the rounded weight as a constant and LoRA beside it, as plain autograd sees it
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    rounded = layer.dequantized_weight(torch.float32).detach()
    out = x2 @ rounded.T + layer.base.bias.detach()
    lora = layer.scaling * (x2.detach() @ a.T @ b.T)
    (out + lora - lora.detach()).pow(2).sum().backward()
    torch.testing.assert_close(qat[0], a.grad)
    torch.testing.assert_close(qat[1], b.grad)
    torch.testing.assert_close(qat[2], x2.grad)  # W_q^T g: the input sees the weight it is multiplied by


def test_dropout_reaches_the_adapter_in_training_only():
    layer = _layer(dropout=0.5)
    x = torch.randn(4, 64)
    with torch.no_grad():
        noisy = layer.train()(x)
        clean = layer.eval()(x)
        assert not torch.allclose(noisy, clean)
        torch.testing.assert_close(clean, layer.converted()(x), atol=1e-6, rtol=0)


def test_qat_lora_trains_and_converts_to_the_int_k_format_of_the_rtn_base(tiny_spec, cpu):
    from tests.conftest import train_losses

    method = build("rtn", "qat", lora={"r": 4, "dropout": 0.0}, bits=4, group_size=32, compute_dtype="float32")
    assert method.name == "qat_lora"
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    losses = train_losses(model, steps=6)
    assert losses[-1] < losses[0]
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.eval()(input_ids=batch).logits
        shipped = method.finalize(model, LoadContext(cpu, model_spec=tiny_spec))
        assert not any(isinstance(m, QatLoRALinear) for m in shipped.modules())
        torch.testing.assert_close(shipped(input_ids=batch).logits, before, atol=1e-4, rtol=0)
    record = method.describe(shipped)
    assert record["quant_format"] == "int4-g32" and record["qat"] == {"target": "int4-g32"}
    assert record["adapter_bytes"] == 0 and record["trainable_params"] > 0  # merged, its training counted
    rtn = build("rtn", "none", bits=4, group_size=32, compute_dtype="float32")
    untrained = rtn.describe(rtn.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    assert record["weight_bytes"] == untrained["weight_bytes"]  # stored exactly as the RTN base


def test_bad_qat_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match="quantization-aware LoRA trains for, and converts to, the INT-k groups"):
        build("bf16", "qat")
    with pytest.raises(ConfigError, match=r"method.bits=5 is not one of 2, 3, 4, 8"):
        build("rtn", "qat", bits=5)
    with pytest.raises(ConfigError, match=r"method.lora options use_rslora: quantization-aware LoRA takes r"):
        build("rtn", "qat", lora={"use_rslora": True})
