"""train.loss=chunked (experiments/harness/loss.py): the loss and its gradients without the whole logits."""

import pytest
import torch

from core.errors import ConfigError
from experiments.harness.loss import chunked_loss, forward_loss
from experiments.harness.models import random_llama_spec
from experiments.harness.train import TrainSettings
from methods.base import LoadContext
from tests.test_methods import make_method


def plain_loss(hidden, weight, labels):
    """The model's own: the whole logits, shifted, cross-entropy over the targets (float64 here)."""
    logits = hidden @ weight.T
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])  # down to one token per chunk, up to all in one
@pytest.mark.parametrize("train_weight", [False, True])  # a frozen output layer (LoRA's), or a trained one
def test_the_chunked_loss_and_its_gradients_equal_the_plain_ones(chunk, train_weight):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 21), generator=generator)
    labels[0, :5] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    grads = {}
    for name, fn in (("plain", plain_loss), ("chunked", lambda h, w, y: chunked_loss(h, w, y, chunk=chunk))):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
        loss = fn(h, w, labels)
        (loss * 2.5).backward()  # a scaled loss (gradient accumulation, a rank's weight) scales the gradients
        grads[name] = (loss.detach(), h.grad, w.grad)
    torch.testing.assert_close(grads["chunked"][0].double(), grads["plain"][0].double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads["chunked"][1], grads["plain"][1], rtol=1e-6, atol=1e-8)
    if train_weight:
        torch.testing.assert_close(grads["chunked"][2].double(), grads["plain"][2], rtol=1e-6, atol=1e-8)
    else:
        assert grads["chunked"][2] is None


def test_a_lora_model_trained_on_the_chunked_loss_gets_the_plain_adapter_gradients(cpu):
    spec = random_llama_spec("tiny")
    method = make_method("lora_bf16", "method.base=fp32", "method.lora.r=4", "method.lora.dropout=0.0")
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=cpu)))
    torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_B" in n))  # B = 0 has no gradient
    ids = torch.randint(0, spec.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["attention_mask"][1, 12:] = 0
    batch["labels"][1, 12:] = -100
    grads, losses = {}, {}
    for kind in ("full", "chunked"):
        model.zero_grad()
        loss = forward_loss(model, model, batch, kind)
        loss.backward()
        losses[kind] = loss.item()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert losses["chunked"] == pytest.approx(losses["full"], rel=1e-6)
    for name in grads["full"]:
        torch.testing.assert_close(grads["chunked"][name], grads["full"][name], rtol=1e-5, atol=1e-7)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the output layer is back


def test_an_unknown_loss_and_a_sharded_chunked_loss_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"train.loss='fused' is not one of full, chunked"):
        TrainSettings(loss="fused")
    with pytest.raises(ConfigError, match="train.loss=chunked with train.strategy=fsdp"):
        TrainSettings(loss="chunked", strategy="fsdp", nproc=2)
