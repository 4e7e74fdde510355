"""Sharded training (train.strategy=fsdp, experiments/distributed.py): real processes, gloo on CPU."""

import json

import pytest

from tests.conftest import compose_config, run_cli

COMMON = ("model=llama_synthetic", "train.max_steps=4", "train.batch_size=4", "method.lora.r=4", "threads=1")
# float32 compute, so that the sharded and the single-process run round alike
METHODS = {
    "lora_fp32": ("method=lora_bf16", "method.base=fp32"),
    "qlora_nf4": ("method=qlora_nf4", "method.compute_dtype=float32"),
    "dora_fp32": ("method=dora_bf16", "method.base=fp32"),
}


def _record(folder):
    [path] = list(folder.glob("*.json"))
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_sharded_processes_train_as_one_and_hold_half_the_model_each(method, tmp_path):
    runs = {}
    for name, extra in (("single", ()), ("fsdp", ("train.strategy=fsdp", "train.nproc=2"))):
        done = run_cli(
            *COMMON,
            *METHODS[method],
            *extra,
            f"results_dir={tmp_path / name}",
            f"hydra.run.dir={tmp_path / (name + '_run')}",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = _record(tmp_path / name)  # one record per run, sharded or not
    single, sharded = runs["single"], runs["fsdp"]
    assert sharded["status"] == "ok" and sharded["env"]["distributed"]["world_size"] == 2
    assert sharded["train"]["losses"] == pytest.approx(single["train"]["losses"], rel=1e-4)
    assert sharded["train"]["tokens"] == single["train"]["tokens"]  # the same global batches
    assert sharded["method"]["weight_bytes"] == single["method"]["weight_bytes"]  # the whole model's storage
    ranks = sharded["memory"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["optimizer_state_bytes"] for r in ranks) == pytest.approx(
        single["memory"]["optimizer_state_bytes"], rel=0.01
    )
    predicted = _sharded_prediction(method, shards=2)  # the memory model, per process
    for rank in ranks:  # each rank holds half of the model, as the memory model predicts
        assert rank["frozen_bytes"] == pytest.approx(predicted["weights"]["weight_bytes"], rel=0.02), rank
        assert rank["trainable_bytes"] == pytest.approx(predicted["weights"]["adapter_bytes"], rel=0.02), rank
        assert rank["optimizer_state_bytes"] == pytest.approx(predicted["parts"]["optimizer_state"], rel=0.02), rank
        assert rank["train_peak_memory_bytes"] > 0


def _sharded_prediction(method: str, shards: int) -> dict:
    from hydra.utils import instantiate

    from analysis.memory_model import TrainShape, predict
    from analysis.method_specs import spec_from_format
    from analysis.model_shapes import resolve_shape
    from experiments.models import resolve_model

    cfg = compose_config(*COMMON, *METHODS[method])
    built = instantiate(cfg.method, _convert_="all")
    shape = resolve_shape(resolve_model(cfg.model).path)
    return predict(shape, spec_from_format(built.method_format()), TrainShape(batch=4, shards=shards))
