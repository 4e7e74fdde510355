"""The trained adapter kept as a file (experiments/harness/adapter_file.py): it loads back, and its size is recorded."""

import pytest
import torch

from experiments.harness.adapter_file import save_trained_adapter
from methods.base import LoadContext
from methods.compose import build
from tests.conftest import run_one, train_losses


def test_a_saved_peft_adapter_loads_onto_the_base_and_computes_what_the_trained_model_did(tiny_spec, cpu, tmp_path):
    from peft import PeftModel

    method = build("fp32", "lora", lora={"r": 4})
    context = LoadContext(cpu, model_spec=tiny_spec)
    torch.manual_seed(0)
    model = method.add_adapters(method.load_base(tiny_spec, context))
    train_losses(model, steps=3)
    saved = save_trained_adapter(model, tmp_path)
    files = sorted(path.name for path in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)  # and peft's model card
    assert saved["bytes"] == sum(path.stat().st_size for path in (tmp_path / "adapter").iterdir())
    assert saved["bytes"] >= 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # fp32 A and B
    loaded = PeftModel.from_pretrained(method.load_base(tiny_spec, context), tmp_path / "adapter").eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_an_adapter_of_our_own_layers_is_saved_as_its_trained_tensors(tiny_spec, cpu, tmp_path):
    from safetensors.torch import load_file

    method = build("rtn", "qalora", bits=4, group_size=32, lora={"r": 4}, compute_dtype="float32")
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    save_trained_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(tensors) == set(trained) and all(torch.equal(tensors[n], trained[n]) for n in trained)


@pytest.mark.slow
def test_a_run_keeps_its_adapter_unless_told_not_to_and_the_run_id_is_the_same(
    tmp_path, tiny_checkpoint_with_bundled_vocab
):
    common = (
        "method=lora_bf16",
        "method.lora.r=4",
        "model=hf",
        f"model.name_or_path={tiny_checkpoint_with_bundled_vocab}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.max_seq_len=64",
        "eval.num_fewshot=0",
        "eval.limit_per_subject=1",
        "eval.subjects=[anatomy]",
        "eval.perplexity.enabled=false",
        "threads=1",
    )
    records = {}
    for save in ("true", "false"):
        records[save] = run_one(tmp_path / save, *common, f"save_adapter={save}")
    kept = records["true"]["train"]["adapter_file"]
    assert kept["path"] == str(tmp_path / "true" / "run" / "adapter")
    assert kept["bytes"] == sum(p.stat().st_size for p in (tmp_path / "true" / "run" / "adapter").iterdir())
    assert "adapter_file" not in records["false"]["train"] and not (tmp_path / "false" / "run" / "adapter").exists()
    assert records["true"]["run_id"] == records["false"]["run_id"]  # keeping the file changes no result
