"""VeRA as an adapter (methods/vera.py): two trained vectors per layer over shared frozen random matrices."""

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build
from methods.merge import load_merged_weights, merged_weights
from methods.vera import VeraAdapter
from tests.conftest import train_losses

R = 8


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_vera_trains_r_plus_d_out_per_layer_and_merges_into_plain_weights_with_its_logits(base, tiny_spec, cpu):
    compute = {} if base == "fp32" else {"compute_dtype": "float32"}
    method = build(base, "vera", vera={"r": R}, **compute)
    context = LoadContext(cpu, model_spec=tiny_spec)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    model = method.load_base(tiny_spec, context)
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    model = method.add_adapters(model)
    with torch.no_grad():  # lambda_b starts at zero: the adapted model is the base
        assert torch.equal(model(input_ids=ids).logits, before)
    linears = [module for module in model.get_base_model().modules() if VeraAdapter.wraps(module)]
    assert linears
    expected = sum(R + layer.out_features for layer in linears)
    record = method.describe(model)
    assert record["trainable_params"] == expected
    losses = train_losses(model, steps=4)
    assert losses[-1] < losses[0], losses
    plain = build("fp32", "none").load_base(tiny_spec, context).eval()
    load_merged_weights(plain, merged_weights(model, torch.float32))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-4, rtol=2e-4)


def test_adapter_bytes_count_the_shared_matrices_once_as_the_memory_model_predicts(tiny_spec, cpu):
    from analysis.memory_model import adapter_tensor_sizes
    from analysis.method_specs import MethodSpec
    from analysis.model_shapes import resolve_shape

    method = build("fp32", "vera", vera={"r": R})
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    record = method.describe(model)
    spec = MethodSpec("vera_fp32", "fp32", 32, adapter="vera", settings=method.method_format().settings)
    trained, frozen = adapter_tensor_sizes(resolve_shape("synthetic_tiny"), spec)
    assert sum(trained) == record["trainable_params"]
    assert 4 * (sum(trained) + sum(frozen)) == record["adapter_bytes"]  # A and B counted once, not per layer


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"r": 0}, r"method.vera.r=0: the rank must be a positive integer"),
        ({"rank": 8}, r"unknown method.vera key\(s\) \['rank'\]; valid: r, target_modules"),
        ({"dropout": 1.0}, r"method.vera.dropout=1.0: must be in \[0, 1\)"),
    ],
)
def test_bad_vera_settings_fail_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        build("bf16", "vera", vera=settings)


def test_vera_refuses_a_base_peft_cannot_wrap_naming_the_adapters_it_takes():
    with pytest.raises(ConfigError, match="adapter=vera on method.base=rtn: .*; on rtn use adapter none, qalora"):
        build("rtn", "vera")
