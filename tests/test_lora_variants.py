"""peft's LoRA variants as adapters (methods/lora_variants.py): what each changes is what its paper says."""

import math

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build
from methods.merge import load_merged_weights, merged_weights
from tests.conftest import train_losses


def _adapted(adapter: str, tiny_spec, cpu, base: str = "fp32", r: int = 4):
    method = build(base, adapter, lora={"r": r, "alpha": 16, "dropout": 0.0})
    context = LoadContext(cpu, model_spec=tiny_spec)
    torch.manual_seed(0)
    plain = method.load_base(tiny_spec, context)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = plain(input_ids=ids).logits.clone()
        weight = plain.model.layers[0].self_attn.q_proj.weight.clone()
    return method, method.add_adapters(plain), ids, before, weight


@pytest.mark.parametrize("adapter", ["pissa", "olora"])
def test_pissa_and_olora_start_from_the_model_itself_with_its_weights_rewritten(adapter, tiny_spec, cpu):
    _, model, ids, before, weight = _adapted(adapter, tiny_spec, cpu)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)  # base + BA is the model
        assert not torch.allclose(layer.get_base_layer().weight, weight, atol=1e-3)  # the base holds the rest
        assert layer.lora_B["default"].weight.abs().sum() > 0  # B does not start at zero, as LoRA's does


def test_rslora_scales_the_update_by_alpha_over_the_square_root_of_the_rank(tiny_spec, cpu):
    for adapter, scaling in (("rslora", 16 / math.sqrt(16)), ("lora", 16 / 16)):
        _, model, *_ = _adapted(adapter, tiny_spec, cpu, r=16)
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(scaling), adapter


@pytest.mark.parametrize("adapter", ["rslora", "pissa", "olora"])
def test_a_trained_variant_merges_into_plain_weights_with_its_logits(adapter, tiny_spec, cpu):
    """The exports start from the merged weights: the base's residual plus the trained update."""
    _, model, ids, *_ = _adapted(adapter, tiny_spec, cpu)
    losses = train_losses(model, steps=4)
    assert losses[-1] < losses[0]
    plain = build("fp32", "none").load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)).eval()
    load_merged_weights(plain, merged_weights(model, torch.float32))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    "adapter, base, reason", [("pissa", "int8", "other quantized formats"), ("olora", "nf4", "cannot hold")]
)
def test_pissa_and_olora_refuse_a_base_they_cannot_start_from_in_one_line(adapter, base, reason):
    with pytest.raises(ConfigError, match=reason) as refused:
        build(base, adapter, lora={"r": 4})
    assert "\n" not in str(refused.value)
