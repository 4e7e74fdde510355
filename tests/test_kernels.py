"""Fused kernels as a setting (experiments/harness/kernels.py): refused before any work where they cannot run;
on a GPU, Liger's model trains to the plain model's loss and adapter gradients within bf16 tolerance."""

import pytest
import torch

from core.errors import ConfigError
from experiments.harness.kernels import apply_kernels, check_kernels_device
from experiments.harness.train import TrainSettings
from methods.base import LoadContext
from methods.compose import build


def test_kernel_settings_are_checked_before_any_work():
    assert TrainSettings().kernels == "none"
    with pytest.raises(ConfigError, match=r"train.kernels='fused' is not one of none, liger"):
        TrainSettings(kernels="fused")
    with pytest.raises(ConfigError, match="use train.loss=full with it"):
        TrainSettings(kernels="liger", loss="chunked")
    with pytest.raises(ConfigError, match="train.kernels=liger needs a CUDA GPU .* not cpu"):
        TrainSettings(kernels="liger").check_device(torch.device("cpu"))
    check_kernels_device("none", torch.device("cpu"))  # the default runs anywhere


def _adapter_grads_and_loss(base: str, kernels: str, tiny_spec, batch):
    torch.manual_seed(0)
    method = build(base, "lora", lora={"r": 8, "alpha": 16, "dropout": 0.0}, compute_dtype="bfloat16")
    device = torch.device("cuda")
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(device, model_spec=tiny_spec)))
    apply_kernels(model, kernels)
    model.train()
    loss = model(input_ids=batch.to(device), labels=batch.to(device)).loss
    loss.backward()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_liger_kernels_give_the_plain_models_loss_and_adapter_gradients(base, tiny_spec):
    pytest.importorskip("liger_kernel")
    batch = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    plain_loss, plain = _adapter_grads_and_loss(base, "none", tiny_spec, batch)
    fused_loss, fused = _adapter_grads_and_loss(base, "liger", tiny_spec, batch)
    assert fused_loss == pytest.approx(plain_loss, rel=2e-2)
    assert plain.keys() == fused.keys() and plain
    for name in plain:  # bf16 tolerance on each adapter tensor's gradient, relative to its size
        scale = plain[name].abs().max().item() or 1.0
        assert (fused[name] - plain[name]).abs().max().item() <= 5e-2 * scale, name
