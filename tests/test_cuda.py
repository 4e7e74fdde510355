"""The CUDA path: bitsandbytes kernels, paged optimizers and their memory, fp16 loss scaling, per-phase peaks.

Skipped without a GPU; scripts/gpu_check.sh runs them (``pytest -m cuda``) on a GPU machine.
The models are random Llamas built on the GPU (experiments.harness.models.random_llama_spec): no
checkpoint and no tokenizer, which a GPU machine without network could not fetch.
"""

import pytest
import torch
from omegaconf import OmegaConf

from analysis.memory_model import TrainShape, predict
from analysis.method_specs import spec_from_method_config
from analysis.model_shapes import resolve_shape
from experiments.harness.measure import PhaseMeter, paged_state_bytes
from experiments.harness.models import random_llama_spec
from experiments.harness.train import TrainSettings, load_checkpoint, make_optimizer, make_scheduler, train
from methods.base import LoadContext
from tests.conftest import compose_config
from tests.test_methods import make_method, random_batches

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def test_qlora_trains_with_a_paged_optimizer_and_reports_cuda_peaks():
    spec = random_llama_spec("tiny")
    method = make_method("qlora_nf4_dq", "method.lora.r=4")
    meter = PhaseMeter(CUDA)
    with meter.phase("load"):
        model = method.add_adapters(method.load_base(spec, LoadContext(device=CUDA)))
    settings = TrainSettings(
        max_steps=3, batch_size=4, warmup_steps=0, optimizer="paged_adamw_32bit", gradient_checkpointing=True
    )
    with meter.phase("train") as phase:
        result = train(model, random_batches(spec.vocab_size), settings, CUDA)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert phase.cuda_max_allocated_bytes > 0
    assert phase.cuda_max_reserved_bytes >= phase.cuda_max_allocated_bytes
    assert phase.peak_memory_bytes == phase.cuda_max_allocated_bytes  # tiny adapters: nothing is paged


def _paged_qlora(rank: int = 128):
    """QLoRA NF4 on the `small` shape with adapters large enough (>= 1e5 weights) for bitsandbytes to page."""
    spec = random_llama_spec("small")
    cfg = compose_config("method=qlora_nf4", f"method.lora.r={rank}")
    method = make_method("qlora_nf4", f"method.lora.r={rank}")
    model = method.add_adapters(method.load_base(spec, LoadContext(device=CUDA)))
    return spec, cfg, model


def test_paged_optimizer_state_is_counted_in_the_reported_peak():
    spec, cfg, model = _paged_qlora()
    settings = TrainSettings(max_steps=2, batch_size=2, warmup_steps=0, optimizer="paged_adamw_32bit")
    meter = PhaseMeter(CUDA)
    with meter.phase("train") as phase:
        result = train(model, random_batches(spec.vocab_size, length=64), settings, CUDA)
    phase.paged_bytes = result.optimizer_paged_bytes
    expected = predict(
        resolve_shape(spec.path),
        spec_from_method_config(OmegaConf.to_container(cfg.method)),
        TrainShape(2, 64, "paged_adamw_32bit"),
    )["optimizer_paged_bytes"]
    assert result.optimizer_paged_bytes == expected > 0  # what the memory model says bitsandbytes pages
    assert phase.peak_memory_bytes == phase.cuda_max_allocated_bytes + result.optimizer_paged_bytes
    assert phase.as_dict()["paged_bytes"] == result.optimizer_paged_bytes


def test_a_resumed_paged_optimizer_keeps_its_state_paged(tmp_path):
    spec, _, model = _paged_qlora()
    checkpoint = tmp_path / "train_state.pt"
    settings = TrainSettings(
        max_steps=2, batch_size=2, warmup_steps=0, optimizer="paged_adamw_32bit", checkpoint_every=1
    )
    first = train(model, random_batches(spec.vocab_size, length=32), settings, CUDA, checkpoint_path=checkpoint)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings, params)
    load_checkpoint(checkpoint, model, optimizer, make_scheduler(settings, optimizer))
    assert paged_state_bytes(optimizer) == first.optimizer_paged_bytes > 0


def test_fp16_lora_trains_with_loss_scaling_on_the_gpu():
    spec = random_llama_spec("tiny")
    method = make_method("lora_fp16", "method.lora.r=4")
    model = method.add_adapters(method.load_base(spec, LoadContext(device=CUDA)))
    settings = TrainSettings(max_steps=4, batch_size=4, warmup_steps=0)
    result = train(model, random_batches(spec.vocab_size), settings, CUDA)
    assert result.loss_scale is not None and result.loss_scale > 1
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # every adapter learned


def test_random_base_is_built_on_the_gpu_without_a_checkpoint():
    spec = random_llama_spec("tiny")
    model = make_method("qlora_nf4").load_base(spec, LoadContext(device=CUDA))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
