"""``python -m experiments.run`` as a user meets it: bad input, failures, records, re-runs."""

import json

import pytest

from experiments.harness.record import read_record
from tests.conftest import run_cli

FAST = ("model=llama_synthetic", "train.max_steps=2", "method.lora.r=4")


def records_in(folder):
    return sorted(folder.glob("*.json")) if folder.exists() else []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=qlora_nf5"], "qlora_nf4_dq"),  # the valid choices are listed
        (["model=llama3"], "smollm2_135m"),
        (["method.lora.r=0"], "LoRA rank must be a positive integer"),
        (["model=hf", "model.name_or_path=/no/such/checkpoint"], "no such file or folder"),
        (["mmlu_file=/no/such/mmlu.jsonl"], "no such file"),
        (["train.max_steps=many"], "max_steps"),
        (["eval.num_fewshot=7"], "from 0 to 5"),
        (["eval.subjects=[astrology]"], "high school geography"),
        (["model=llama_synthetic", "model.preset=70b"], "llama2_7b"),
        (["train.optimizer=paged_adamw_32bit", "device=cpu"], "adamw_torch"),
        (["eval.perplexity.source=c4"], "mmlu_heldout, wikitext2"),
        (["method=qalora", "method.group_size=128"], "does not divide"),
        (["method=qalora", "method.bits=5"], "is not one of 2, 3, 4, 8"),
        (["method.base=nf5"], "nf4, nf4_dq, fp4, fp4_dq, int8, rtn, gptq"),
        (["method.adapter=ia3"], "none, lora, dora, loftq, prefix, llama_adapter, qalora"),
        (["method.base=rtn", "method.adapter=lora"], "on rtn use adapter none, qalora"),
        (["method.base=int8", "method.adapter=loftq"], "LoftQ re-quantizes a bitsandbytes 4-bit base"),
        (["method=prefix_bf16", "method.prefix.num_virtual_tokens=0"], "num_virtual_tokens=0"),
        (["method=llama_adapter_bf16", "export.formats=[gguf_q8_0]"], "cannot be merged"),
        (["train.strategy=deepspeed"], "is not one of single, fsdp, ddp"),
        (["train.strategy=single", "train.nproc=2"], "one process for train.strategy=single"),
        (["method=base_bf16", "train.strategy=ddp", "train.nproc=2"], "trains nothing"),
        (["train.strategy=fsdp", "train.nproc=3"], "must split evenly"),
        (["method=qalora", "train.strategy=fsdp", "train.nproc=2"], "cannot train sharded"),
        (["train.strategy=fsdp", "train.nproc=2", "export.formats=[nf4]"], "use train.strategy=single"),
        (["train.strategy=fsdp", "train.nproc=2", "train.compile=true"], "does not compile yet"),
        (["train.kernels=triton"], "is not one of none, liger"),
        (["cpu_heap=jemalloc"], "cpu_heap='jemalloc': must be one of exact, fast"),
        (["train.kernels=liger", "device=cpu"], "train.kernels=liger needs a CUDA GPU"),
        (["train.kernels=liger", "train.loss=chunked"], "Liger brings its own fused linear cross-entropy"),
        (
            ["train.strategy=fsdp", "train.nproc=2", "train.optimizer=paged_adamw_32bit"],
            "use train.optimizer=adamw_torch",
        ),
    ],
)
def test_bad_input_fails_fast_with_one_clear_message_and_no_record(tmp_path, overrides, message):
    result = run_cli(*overrides, f"results_dir={tmp_path / 'records'}", timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert records_in(tmp_path / "records") == []


def test_run_writes_one_complete_record_and_skips_it_when_rerun(tmp_path):
    args = (
        *FAST,
        "method=qlora_nf4_dq",
        f"results_dir={tmp_path}",
        f"checkpoint_dir={tmp_path / 'ck'}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    [path] = records_in(tmp_path)
    record = read_record(path)
    assert record["status"] == "ok" and record["method"]["name"] == "qlora_nf4_dq"
    for key in ("weight_bits_per_param", "weight_bytes"):
        assert record["method"][key] > 0
    assert record["train"]["steps"] == 2 and record["train"]["loss_first"] > 0
    assert record["train"]["peak_memory_bytes"] > 0
    assert record["env"]["packages"]["torch"] and "git_commit" in record["env"]
    assert record["model"]["synthetic"] is True and record["eval"] == {}  # no accuracy for random weights
    again = run_cli(*args)
    assert again.returncode == 0
    if record["env"]["git_dirty"] is False:  # made by a clean commit (as in CI): it stands, no work redone
        assert "skip" in again.stdout and read_record(path)["created_at"] == record["created_at"]
    else:  # uncommitted changes could change any figure: done again (tests/test_stale_results.py)
        assert "not a clean git commit" in again.stdout


def test_a_training_state_left_beside_an_ok_record_is_removed_and_never_resumed(tmp_path):
    """A job killed between its record's write and its checkpoint's removal leaves the final training state
    behind: the next run of the configuration removes it, whether the record stands or the run is done again
    (another commit: resuming the old code's state would skip its training)."""
    args = (*FAST, "method=lora_bf16", f"results_dir={tmp_path}", f"checkpoint_dir={tmp_path / 'ck'}")
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'first'}")
    assert first.returncode == 0, first.stderr[-3000:]
    [path] = records_in(tmp_path)
    leftover = tmp_path / "ck" / read_record(path)["run_id"] / "train_state.pt"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"the final state of the run the record stands for")
    again = run_cli(*args, f"hydra.run.dir={tmp_path / 'again'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not leftover.exists()
    record = read_record(path)  # the one that stood, or the new run's, trained from its first step
    assert record["status"] == "ok" and record["train"]["resumed_from_step"] == 0


@pytest.mark.parametrize("error, status", [("runtime", "failed"), ("oom", "oom")])
def test_failure_during_a_run_is_recorded_and_exits_nonzero(tmp_path, error, status):
    result = run_cli(
        *FAST,
        "hydra.searchpath=[file://tests/conf]",
        "method=broken_finalize",
        f"method.error={error}",
        f"results_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'out'}",
    )
    assert result.returncode == 1
    [path] = records_in(tmp_path)
    record = read_record(path)
    assert record["status"] == status
    assert record["train"]["steps"] == 2  # what was done before the failure is kept
    assert record["error"]["type"] in ("RuntimeError", "OutOfMemoryError")


def test_a_sweep_goes_on_past_a_failed_run_and_lists_it(tmp_path):
    result = run_cli(
        "-m",
        *FAST,
        "hydra.searchpath=[file://tests/conf]",
        "method=lora_bf16,broken_finalize",
        f"results_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 1
    statuses = sorted(read_record(p)["status"] for p in records_in(tmp_path))
    assert statuses == ["failed", "ok"]
    assert "FAILED broken_finalize" in result.stdout and "1 ok, 1 failed" in result.stdout


def test_records_are_written_atomically(tmp_path):
    from experiments.harness.record import write_record

    path = write_record({"a": 1}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_run_id_is_stable_and_ignores_settings_that_do_not_change_results():
    from experiments.harness.record import run_id_of
    from tests.conftest import compose_config

    base = run_id_of(compose_config("method=qlora_nf4"))
    assert base == run_id_of(compose_config("method=qlora_nf4"))
    for same in ("train.checkpoint_every=5", "train.log_every=3", "eval.batch_size=2", "results_dir=/elsewhere"):
        assert run_id_of(compose_config("method=qlora_nf4", same)) == base, same
    for different in ("seed=1", "train.lr=1e-4", "method.lora.r=8", "eval.num_fewshot=0"):
        assert run_id_of(compose_config("method=qlora_nf4", different)) != base, different


def test_a_sweep_goes_on_past_a_job_whose_config_is_rejected(tmp_path):
    result = run_cli(
        "-m",
        "model=llama_synthetic",
        "train.max_steps=2",
        "method=lora_bf16",
        "method.lora.r=0,4",
        f"results_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 1
    assert [read_record(p)["status"] for p in records_in(tmp_path)] == ["ok"]
    assert "INVALID job" in result.stdout and "LoRA rank must be a positive integer" in result.stdout
    assert "1 ok, 1 failed" in result.stdout
