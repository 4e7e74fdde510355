"""The CUDA path: bitsandbytes kernels, a paged optimizer, per-phase CUDA peaks. Skipped without a GPU."""

import pytest
import torch

from experiments.measure import PhaseMeter
from experiments.train import TrainSettings, train
from methods.base import LoadContext
from tests.test_methods import make_method, random_batches

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_qlora_trains_with_a_paged_optimizer_and_reports_cuda_peaks(tiny_spec):
    device = torch.device("cuda")
    method = make_method("qlora_nf4_dq", "method.lora.r=4")
    meter = PhaseMeter(device)
    with meter.phase("load"):
        model = method.add_adapters(method.load_base(tiny_spec, LoadContext(device=device)))
    settings = TrainSettings(max_steps=3, batch_size=4, warmup_steps=0, optimizer="paged_adamw_32bit",
                             gradient_checkpointing=True)
    with meter.phase("train") as phase:
        result = train(model, random_batches(tiny_spec.vocab_size), settings, device)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert phase.cuda_max_allocated_bytes > 0
    assert phase.cuda_max_reserved_bytes >= phase.cuda_max_allocated_bytes
    assert phase.peak_memory_bytes == phase.cuda_max_allocated_bytes  # the GPU's figure is the one reported
