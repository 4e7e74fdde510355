"""Every conf/method/ file, run by the harness end to end: load, train, finalize, evaluate, record.

A newcomer's method gets the same smoke test by adding its config file: no test to write.
The model is a tiny random Llama with the bundled tokenizer's vocabulary, so that MMLU and
perplexity run on it (its accuracy means nothing; the evaluation's code path is what runs).
"""

import pytest
import torch

from tests.conftest import METHOD_CONFIGS, compose_config, run_one

# Small enough for the tiny model: a rank-4 adapter, 8 calibration segments of 64 tokens.
TINY_OVERRIDES = {
    "lora": ["method.lora.r=4"],
    "vera": ["method.vera.r=8"],
    "eva": ["method.eva.n_samples=8", "method.eva.seq_len=64", "method.eva.batch_size=4"],
    "corda": ["method.corda.n_samples=8", "method.corda.seq_len=64"],
    "calibration": ["method.calibration.n_samples=8", "method.calibration.seq_len=64"],
}
SUBJECTS = ("anatomy", "astronomy")


def _compute_paths(name: str) -> list[tuple[str, str | None]]:
    """A preset with ``compute_dtype: auto`` takes one of two paths by CPU: bfloat16 where the CPU computes it
    natively, float32 (over bf16-stored weights, or as 4-bit layers' compute dtype) on AVX2-only CPUs.
    Both run here, whatever this CPU is; a preset that fixes its dtype runs as it is."""
    if compose_config(f"method={name}").method.get("compute_dtype") != "auto":
        return [(name, None)]
    return [(name, "bfloat16"), (name, "float32")]


PRESET_PATHS = [path for name in METHOD_CONFIGS for path in _compute_paths(name)]


@pytest.mark.slow
@pytest.mark.parametrize("name, compute_dtype", PRESET_PATHS, ids=lambda value: str(value))
def test_every_method_config_runs_through_training_finalize_and_evaluation(
    name, compute_dtype, tiny_checkpoint_with_bundled_vocab, tmp_path
):
    if "gptq" in name:
        pytest.importorskip("gptqmodel", reason="GPTQ methods need the [gptq] extra")
    method_cfg = compose_config(f"method={name}").method
    tiny = [override for key, extra in TINY_OVERRIDES.items() if key in method_cfg for override in extra]
    if compute_dtype is not None:
        tiny.append(f"method.compute_dtype={compute_dtype}")
    record = run_one(
        tmp_path,
        f"method={name}",
        *tiny,
        "model=hf",
        f"model.name_or_path={tiny_checkpoint_with_bundled_vocab}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.max_seq_len=64",
        "eval.num_fewshot=1",
        "eval.limit_per_subject=1",
        f"eval.subjects=[{','.join(SUBJECTS)}]",
        "eval.perplexity.seq_len=64",
        "eval.perplexity.max_tokens=256",
        "threads=1",
    )
    assert record["method"]["name"] == name and record["method"]["family"]
    if compute_dtype is not None:
        assert record["method"]["compute_dtype"] == compute_dtype
    assert record["eval"]["mmlu"]["n_questions"] == len(SUBJECTS)
    assert torch.isfinite(torch.tensor(record["eval"]["perplexity"]["perplexity"]))
    if compose_config(f"method={name}").method.get("adapter", "lora") != "none":
        assert record["train"]["steps"] == 2 and record["method"]["trainable_params"] > 0
    log = (tmp_path / "run" / "run.log").read_text()
    for phase in record["phases"]:  # every phase says in the run's log when it starts and ends
        assert f"phase {phase}: started" in log and f"phase {phase}: done" in log
