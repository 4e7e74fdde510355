"""train.packing: several examples per row, each attending only to itself (experiments/harness/data.py's
``pack``), so that the model computes less padding for the same loss."""

import json

import pytest
import torch

from experiments.harness.data import BatchSource, TokenizedExample, bucket_width, collate, pack, pad_to_width
from experiments.harness.models import random_llama_spec
from experiments.harness.train import TrainSettings, train
from methods.base import LoadContext
from tests.conftest import run_cli
from tests.test_methods import make_method

# float32 bases and compute, no dropout: packed and unpacked compute the same sums in other orders
PACKING_ADAPTERS = {
    "lora": ("lora_bf16", "method.base=fp32", "method.lora.r=4", "method.lora.dropout=0.0"),
    "dora": ("dora_bf16", "method.base=fp32", "method.lora.r=4", "method.lora.dropout=0.0"),
    "qalora": ("qalora", "method.compute_dtype=float32", "method.lora.r=4", "method.lora.dropout=0.0"),
    "llama_adapter": ("llama_adapter_bf16", "method.base=fp32"),
}


def examples(vocab: int, lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    """Random examples of these lengths, the loss on the second half of each (a prompt, then a response)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=generator).tolist()
        rows.append(TokenizedExample(ids, [-100] * (n // 2) + ids[n // 2 :]))
    return rows


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each position's next-token loss (0 where nothing is predicted), as the model's own loss shifts it."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses * (labels != -100)


def per_example_losses_packed(model, batch: dict, capacity: int) -> dict[tuple, torch.Tensor]:
    """Each packed sequence's token losses, by its token ids (a sequence starts where its position id is 0)."""
    packed = pack(batch, capacity)
    losses = token_losses(model, packed)
    found = {}
    for r, positions in enumerate(packed["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            found[tuple(packed["input_ids"][r, start:end].tolist())] = losses[r, start : end - 1]
    return found


@pytest.mark.parametrize("adapter", PACKING_ADAPTERS)
def test_each_example_of_a_packed_batch_has_its_unpacked_losses(adapter, cpu):
    spec = random_llama_spec("tiny")
    method = make_method(*PACKING_ADAPTERS[adapter])
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(spec, LoadContext(device=cpu)))
    if adapter == "llama_adapter":  # its gate starts at zero, where the adapter changes nothing
        for name, p in model.named_parameters():
            if "adaption_gate" in name:
                torch.nn.init.constant_(p, 0.5)
    model.eval()
    rows = examples(spec.vocab_size, [23, 5, 17, 9, 12, 30])
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        unpacked = token_losses(model, batch)
        packed = per_example_losses_packed(model, batch, capacity=32)
        whole = model(**batch).loss
        whole_packed = model(**pack(batch, capacity=32)).loss
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        torch.testing.assert_close(packed[tuple(row.input_ids)], unpacked[i, : n - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole_packed, whole, rtol=1e-5, atol=1e-6)  # the batch's mean loss


def test_packing_lays_examples_end_to_end_within_the_capacity_and_targets_the_same_tokens():
    rows = examples(100, [23, 5, 17, 9, 12, 30])
    batch = collate(rows, pad_id=0)
    packed = pack(batch, capacity=32)
    assert packed["input_ids"].shape[1] <= 32 and "attention_mask" not in packed
    real = sum(len(r.input_ids) for r in rows)
    assert packed["input_ids"].numel() < batch["input_ids"].numel()  # less padding computed
    assert int((packed["position_ids"] == 0).sum()) >= len(rows)  # each example starts at position 0
    targets = lambda b: int((b["labels"][:, 1:] != -100).sum())  # noqa: E731 - what the loss predicts
    assert targets(packed) == targets(batch)
    assert packed["input_ids"].numel() >= real
    # a wider bucket (train.compile) adds a padding sequence of its own: the loss does not change
    padded = pad_to_width(packed, bucket_width(packed["input_ids"].shape[1], 128))
    assert padded["input_ids"].shape[1] == 64 and padded["position_ids"][0, -1] > 0
    assert targets(padded) == targets(batch)


def test_a_packed_training_run_has_the_unpacked_losses_and_counts_less_padding(cpu):
    spec = random_llama_spec("tiny")
    rows = examples(spec.vocab_size, [40, 7, 25, 11, 33, 18, 9, 28, 15, 21, 6, 37], seed=1)
    results = {}
    for packing in (False, True):
        method = make_method(*PACKING_ADAPTERS["lora"])
        torch.manual_seed(0)
        model = method.add_adapters(method.load_base(spec, LoadContext(device=cpu)))
        settings = TrainSettings(max_steps=6, warmup_steps=0, lr=1e-2, packing=packing, max_seq_len=64)
        results[packing] = train(model, BatchSource(rows, batch_size=4, pad_id=0, seed=0), settings, cpu)
    unpacked, packed = results[False], results[True]
    assert packed.losses == pytest.approx(unpacked.losses, rel=1e-4)
    assert packed.tokens == unpacked.tokens and packed.target_tokens == unpacked.target_tokens > 0
    assert 0 <= packed.padded_tokens < unpacked.padded_tokens


def test_packing_a_prefix_tuned_run_is_refused_before_any_work(tmp_path):
    done = run_cli(
        "method=prefix_bf16",
        "model=llama_synthetic",
        "train.packing=true",
        f"results_dir={tmp_path / 'records'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: train.packing=true with method.adapter=prefix"), done.stderr[-2000:]
    assert "use train.packing=false (packing takes lora, dora" in lines[-1]
    assert not (tmp_path / "records").exists() or not list((tmp_path / "records").glob("*.json"))


@pytest.mark.slow
def test_a_packed_run_through_the_cli_records_its_padding_and_the_unpacked_losses(tmp_path):
    records = {}
    for packing in ("false", "true"):
        done = run_cli(
            "method=lora_bf16",
            "method.base=fp32",
            "model=llama_synthetic",
            "method.lora.r=4",
            "train.max_steps=3",
            f"train.packing={packing}",
            "threads=1",
            f"results_dir={tmp_path / packing}",
            f"hydra.run.dir={tmp_path / (packing + '_run')}",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        [path] = (tmp_path / packing).glob("*.json")
        records[packing] = json.loads(path.read_text())
    plain, packed = records["false"], records["true"]
    assert packed["config"]["train"]["packing"] is True and packed["run_id"] != plain["run_id"]
    assert packed["train"]["losses"] == pytest.approx(plain["train"]["losses"], rel=1e-4)
    assert packed["train"]["tokens"] == plain["train"]["tokens"]
    assert packed["train"]["padded_tokens"] < plain["train"]["padded_tokens"]
