"""CorDA as an adapter (methods/corda.py): LoRA started from the weight's directions that act most on the data."""

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build

R = 4


def _segments(n: int = 8, length: int = 32) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, length), generator=generator).tolist()


def _covariance(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The CorDA paper's context covariance of a layer's inputs, as peft sums it (each segment scaled by its
    largest value), with the diagonal loading peft adds before inverting it."""
    total = 0
    for x in inputs:
        x = x.squeeze(0).float()
        x = x / x.max().abs()
        total = total + x.T @ x
    covariance = total / len(inputs)
    return covariance + 0.01 * covariance.diag().mean() * torch.eye(covariance.shape[0])


def test_corda_starts_as_the_base_with_the_top_directions_of_the_weight_times_its_inputs_covariance(tiny_spec, cpu):
    method = build("fp32", "corda", lora={"r": R}, corda={"n_samples": 8, "seq_len": 32})
    segments = _segments()
    base = method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec, calibration=segments))
    ids = torch.tensor(segments)
    layer = base.model.layers[0].self_attn.q_proj
    weight = layer.weight.detach().clone()
    inputs = []
    hook = layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        for row in ids.split(1):
            base(input_ids=row)
        hook.remove()
        before = base(input_ids=ids).logits.clone()

    model = method.add_adapters(base).eval()  # no LoRA dropout
    with torch.no_grad():  # the base keeps the residual W - sBA: the model starts as itself
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=0)
    wrapped = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = wrapped.scaling["default"] * wrapped.lora_B["default"].weight @ wrapped.lora_A["default"].weight
    covariance = _covariance(inputs)
    # sBA C is the best rank-R approximation of W C: the directions of W that act most on these inputs
    u, s, vh = torch.linalg.svd(weight @ covariance, full_matrices=False)
    best = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    torch.testing.assert_close(delta.detach() @ covariance, best, atol=1e-3 * s[0].item(), rtol=0)
    # ... which are not the weight's own top directions (PiSSA's start) on inputs that are not isotropic
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert (delta.detach() - u[:, :R] @ torch.diag(s[:R]) @ vh[:R]).norm() > 0.1 * delta.norm()
    assert method.describe(model)["corda"] == {"mode": "ipm", "n_samples": 8, "seq_len": 32}


def test_corda_trains_on_a_bf16_base(tiny_spec, cpu):
    from tests.conftest import train_losses

    method = build("bf16", "corda", lora={"r": R}, corda={"n_samples": 8, "seq_len": 32})
    model = method.add_adapters(
        method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec, calibration=_segments()))
    )
    losses = train_losses(model, steps=4)
    assert losses[-1] < losses[0]


def test_corda_without_its_data_on_a_quantized_base_or_with_bad_settings_fails_in_one_line(tiny_spec, cpu):
    method = build("fp32", "corda", lora={"r": R})
    assert method.calibration.n_samples == 16  # the harness cuts this much of the training texts for it
    with pytest.raises(RuntimeError, match="CorDA starts from the run's data"):
        method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    with pytest.raises(ConfigError, match=r"method.corda.mode='kpm' needs question-answer data .* valid: ipm"):
        build("bf16", "corda", corda={"mode": "kpm"})
    with pytest.raises(ConfigError, match=r"method.corda.seq_len=0: must be a positive integer"):
        build("bf16", "corda", corda={"seq_len": 0})
    with pytest.raises(ConfigError, match="CorDA rewrites the base weight"):
        build("nf4", "corda")
