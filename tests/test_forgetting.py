"""Forgetting (experiments/evaluation/forgetting.py): the loss on general text as training starts and after."""

import pytest
from omegaconf import OmegaConf

from experiments.harness.record import result_config
from tests.conftest import compose_config, run_cli, run_one

TINY_RUN = (
    "model=hf",
    "train.max_steps=4",
    "train.batch_size=2",
    "train.max_seq_len=64",
    "train.lr=1e-2",
    "eval.num_fewshot=0",
    "eval.limit_per_subject=1",
    "eval.subjects=[anatomy]",
    "eval.perplexity.enabled=false",
    "eval.forgetting.enabled=true",
    "eval.forgetting.seq_len=64",
    "eval.forgetting.max_tokens=512",
    "threads=1",
)


def _record(folder, checkpoint, *overrides) -> dict:
    return run_one(folder, *TINY_RUN, f"model.name_or_path={checkpoint}", *overrides)


@pytest.mark.slow
def test_a_run_records_its_general_text_loss_before_and_after_training(tmp_path, tiny_checkpoint_with_bundled_vocab):
    """Trained at a high learning rate on MMLU questions, the tiny model's loss on Python's documentation moves;
    the record says by how much, over the same windows before and after, each phase timed."""
    trained = _record(tmp_path / "lora", tiny_checkpoint_with_bundled_vocab, "method=lora_bf16", "method.lora.r=4")
    forgetting = trained["eval"]["forgetting"]
    assert forgetting["source"] == "python_docs" and forgetting["n_tokens"] == 512 - 512 // 64
    assert forgetting["forgetting"] == pytest.approx(forgetting["loss_after"] - forgetting["loss_before"])
    assert forgetting["forgetting"] != 0  # training moved it
    pooled = sum(forgetting["blocks"]["nll"]) / forgetting["n_tokens"]
    assert pooled == pytest.approx(forgetting["loss_after"], rel=1e-5)
    assert {"forgetting_before", "eval_forgetting"} <= set(trained["phases"])
    untrained = _record(tmp_path / "base", tiny_checkpoint_with_bundled_vocab, "method=base_bf16")
    assert untrained["eval"]["forgetting"]["forgetting"] == 0  # nothing trained: the same model twice
    assert untrained["eval"]["forgetting"]["loss_before"] == forgetting["loss_before"]  # LoRA starts as the base


def test_off_by_default_and_then_it_leaves_the_run_id_as_it_was():
    """Records made before forgetting existed keep their id: the block at its default is left out of the id."""
    config = OmegaConf.to_container(compose_config(), resolve=True)
    assert config["eval"]["forgetting"]["enabled"] is False
    without = {**config, "eval": {k: v for k, v in config["eval"].items() if k != "forgetting"}}
    assert result_config(config) == result_config(without)
    config["eval"]["forgetting"]["enabled"] = True
    assert result_config(config) != result_config(without)


def test_an_unknown_source_fails_before_any_work_naming_the_sources(tmp_path):
    done = run_cli(
        "eval.forgetting.enabled=true", "eval.forgetting.source=c4", f"results_dir={tmp_path}", "train.max_steps=1"
    )
    assert done.returncode != 0
    assert "eval.forgetting.source='c4' is not one of python_docs, wikitext2" in done.stderr
    assert not list(tmp_path.glob("*.json"))
