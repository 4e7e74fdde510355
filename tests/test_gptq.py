"""GPTQ through GPTQModel: its layers read back exactly, it beats round-to-nearest, QA-LoRA builds on it."""

import pytest
import torch

pytest.importorskip("gptqmodel", reason="GPTQ methods need the [gptq] extra: pip install -e '.[gptq]'")

from core.shapes import LLAMA_BLOCK_LINEARS  # noqa: E402
from methods.base import LoadContext  # noqa: E402
from methods.gptq import GPTQ, layer_codes, load_quantized, quantize_checkpoint  # noqa: E402
from methods.int_quant import GroupQuantLinear, dequantize, rtn_quantize  # noqa: E402
from methods.loading import load_pretrained  # noqa: E402
from methods.qalora import QALoRA, QALoRALinear  # noqa: E402
from methods.storage import is_gptq_layer  # noqa: E402

BITS, GROUP = 3, 32


@pytest.fixture(scope="module")
def calibration(tiny_spec):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_spec.vocab_size, (16, 64), generator=generator).tolist()


@pytest.fixture(scope="module")
def gptq_folder(tiny_spec, calibration, tmp_path_factory):
    return quantize_checkpoint(
        tiny_spec.path,
        calibration,
        bits=BITS,
        group_size=GROUP,
        sym=False,
        desc_act=False,
        batch_size=4,
        cache_root=tmp_path_factory.mktemp("gptq"),
    )


@pytest.fixture(scope="module")
def gptq_model(gptq_folder):
    return load_quantized(gptq_folder, torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gptq_model_computes_in_the_configured_dtype_and_the_record_says_so(gptq_folder, dtype):
    method = GPTQ("gptq", bits=BITS, group_size=GROUP, compute_dtype=dtype)
    model = load_quantized(gptq_folder, torch.device("cpu"), method.compute_dtype)
    assert model.dtype == method.compute_dtype
    assert model.get_input_embeddings().weight.dtype == method.compute_dtype
    assert method.describe(model)["compute_dtype"] == dtype


def test_gptq_rejects_a_compute_dtype_its_kernels_lack():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="float32.*bfloat16, float16"):
        GPTQ("gptq", bits=BITS, group_size=GROUP, compute_dtype="float32")


def test_gptq_layers_read_back_as_integer_codes_scales_and_zeros(gptq_model):
    layers = [m for m in gptq_model.modules() if is_gptq_layer(m)]
    assert len(layers) == 2 * len(LLAMA_BLOCK_LINEARS)
    for layer in layers:
        codes, scales, zeros = layer_codes(layer)
        assert int(codes.max()) <= 2**BITS - 1 and torch.equal(zeros, zeros.round())
        eye = torch.eye(layer.in_features, dtype=layer.scales.dtype)
        assert torch.allclose(dequantize(codes, scales, zeros, GROUP), layer(eye).float().T, atol=1e-3)


def test_gptq_layer_output_error_is_lower_than_round_to_nearest(tiny_spec, calibration, gptq_model):
    """Same layers, same calibration inputs, same bits and group size: GPTQ's error is smaller."""
    model = load_pretrained(tiny_spec, torch.device("cpu"), torch.float32)
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0]))
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in LLAMA_BLOCK_LINEARS
    ]
    with torch.no_grad():
        model(torch.tensor(calibration))
    for hook in hooks:
        hook.remove()
    quantized = {name: m for name, m in gptq_model.named_modules() if is_gptq_layer(m)}
    gptq_error = rtn_error = 0.0
    for name, xs in inputs.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1])
        weight = model.get_submodule(name).weight.float()
        reference = x @ weight.T
        gptq_weight = dequantize(*layer_codes(quantized[name]), GROUP)
        rtn_weight = dequantize(*rtn_quantize(weight, BITS, GROUP), GROUP)
        gptq_error += (x @ gptq_weight.T - reference).pow(2).sum().item()
        rtn_error += (x @ rtn_weight.T - reference).pow(2).sum().item()
    assert gptq_error < rtn_error


def test_qalora_on_a_gptq_base_merges_exactly(tiny_spec, calibration):
    method = QALoRA(
        "qalora",
        bits=BITS,
        group_size=GROUP,
        base_quantizer="gptq",
        compute_dtype="float32",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        calibration={"n_samples": 16, "seq_len": 64},
    )
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(torch.device("cpu"), calibration=calibration)))
    for module in model.modules():
        if isinstance(module, QALoRALinear):
            module.qalora_B.data.normal_(0, 0.5)
    tokens = torch.randint(0, tiny_spec.vocab_size, (2, 16))
    with torch.no_grad():
        before = model(tokens).logits
        after = method.finalize(model, None)(tokens).logits
    assert (after - before).abs().max() < 1e-3
    assert method.describe(model)["base_quantizer"] == "gptq"


def test_qalora_on_gptqmodels_kernels_computes_and_trains_as_the_plain_path_and_merges_exactly(tiny_spec, calibration):
    """method.kernel=gptqmodel: GPTQModel's layer computes the base's product; outputs, adapter gradients and the
    exact merge into INT-k zero points are the plain path's (both from the same cached GPTQ checkpoint)."""
    settings = dict(
        bits=4,
        group_size=GROUP,
        base_quantizer="gptq",
        compute_dtype="float16",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        calibration={"n_samples": 16, "seq_len": 64},
    )
    context = LoadContext(torch.device("cpu"), calibration=calibration)
    models = {}
    for kernel in ("plain", "gptqmodel"):
        method = QALoRA("qalora", kernel=kernel, **settings)
        base = method.load_base(tiny_spec, context)
        torch.manual_seed(0)  # the same A in both
        models[kernel] = (method, method.add_adapters(base))
    plain, fused = (models[k][1] for k in ("plain", "gptqmodel"))
    plain_layer, fused_layer = (m.model.layers[0].mlp.down_proj for m in (plain, fused))
    assert isinstance(plain_layer.base, GroupQuantLinear) and not isinstance(fused_layer.base, GroupQuantLinear)
    for model in (plain, fused):
        for module in model.modules():
            if isinstance(module, QALoRALinear):
                module.qalora_B.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, tiny_spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for kernel, model in (("plain", plain), ("gptqmodel", fused)):
        logits = model(tokens).logits.float()
        logits.square().mean().backward()
        layer = model.model.layers[0].mlp.down_proj
        outputs[kernel] = (logits.detach(), layer.qalora_A.grad.clone(), layer.qalora_B.grad.clone())
    for got, want in zip(outputs["gptqmodel"], outputs["plain"]):  # float16 products in another order
        assert (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3
    method = models["gptqmodel"][0]
    with torch.no_grad():
        before = fused(tokens).logits.float()
        after = method.finalize(fused, None)(tokens).logits.float()
    assert (after - before).abs().max() <= 1e-2 * before.abs().max()
    assert method.describe(fused)["kernel"] == "gptqmodel" and method.describe(fused)["merged"]


def test_gptqmodels_kernels_need_the_gptq_base():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="method.kernel=gptqmodel computes with GPTQModel's layers"):
        QALoRA("qalora", base_quantizer="rtn", kernel="gptqmodel")
    with pytest.raises(ConfigError, match=r"method.kernel='marlin' is not one of plain, gptqmodel"):
        QALoRA("qalora", base_quantizer="gptq", kernel="marlin")
