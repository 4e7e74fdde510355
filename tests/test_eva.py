"""EVA as an adapter (methods/eva.py): A starts along the directions the layer's inputs vary in on the data."""

import pytest
import torch

from core.errors import ConfigError
from methods.base import LoadContext
from methods.compose import build

R = 4


def _segments(n: int = 8, length: int = 32) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, length), generator=generator).tolist()


def test_eva_starts_as_the_base_with_a_along_the_principal_directions_of_each_layers_inputs(tiny_spec, cpu):
    method = build("fp32", "eva", lora={"r": R}, eva={"rho": 1.0, "n_samples": 8, "seq_len": 32, "batch_size": 4})
    segments = _segments()
    base = method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec, calibration=segments))
    ids = torch.tensor(segments)
    inputs = []
    hook = base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    hook.remove()
    model = method.add_adapters(base)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)  # B starts at zero
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight.detach()  # rho=1: every layer keeps rank R
    assert a.shape[0] == R
    torch.testing.assert_close(a @ a.T, torch.eye(R), atol=1e-4, rtol=0)  # orthonormal directions
    x = inputs[0].reshape(-1, a.shape[1])
    principal = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:R]
    captured = (principal @ a.T).pow(2).sum() / R  # 1 when A spans the top-R principal subspace
    chance = R / a.shape[1]  # the share a random R-dimensional subspace captures on average
    # peft's incremental PCA is randomised and stops once its components converge: near, not exactly, the SVD's
    assert captured > 0.6 and captured > 10 * chance, captured.item()
    assert method.describe(model)["eva"]["rho"] == 1.0


def test_eva_redistributes_ranks_with_rho_and_trains(tiny_spec, cpu):
    from tests.conftest import train_losses

    method = build("bf16", "eva", lora={"r": R}, eva={"rho": 2.0, "n_samples": 8, "seq_len": 32, "batch_size": 4})
    model = method.add_adapters(
        method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec, calibration=_segments()))
    )
    ranks = [m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert max(ranks) <= 2 * R and len(set(ranks)) > 1  # some layers gave rank to others
    losses = train_losses(model, steps=4)
    assert losses[-1] < losses[0]


def test_eva_without_its_data_or_with_bad_settings_fails_in_one_line(tiny_spec, cpu):
    method = build("fp32", "eva", lora={"r": R})
    assert method.calibration.n_samples == 16  # the harness cuts this much of the training texts for it
    with pytest.raises(RuntimeError, match="EVA starts from the run's data"):
        method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    with pytest.raises(ConfigError, match=r"method.eva.rho=0.5: must be at least 1"):
        build("bf16", "eva", eva={"rho": 0.5})
    with pytest.raises(ConfigError, match=r"method.eva.n_samples=0: must be a positive integer"):
        build("bf16", "eva", eva={"n_samples": 0})
