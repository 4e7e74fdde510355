"""No stale results: a record stands for a run only if made by the same clean commit on the same kind of
device; otherwise the run is done again and the old record is kept under superseded/, never destroyed."""

import json

import pytest

from experiments.harness.record import read_record, reuse_refusal
from tests.conftest import run_cli

ENV = {"git_commit": "a" * 40, "git_dirty": False, "device": "cpu", "device_name": "Intel(R) Xeon(R) Processor"}
TINY = ("model=llama_synthetic", "method=lora_bf16", "method.lora.r=4", "train.max_steps=1", "threads=1")


def test_only_an_ok_record_of_the_same_clean_commit_and_device_is_reused():
    ok = {"status": "ok", "env": dict(ENV)}
    assert reuse_refusal(ok, dict(ENV)) is None
    assert "status is failed" in reuse_refusal({**ok, "status": "failed"}, ENV)
    assert "commit bbbbbbbbbb" in reuse_refusal({**ok, "env": {**ENV, "git_commit": "b" * 40}}, ENV)
    assert "(dirty)" in reuse_refusal({**ok, "env": {**ENV, "git_dirty": True}}, ENV)
    assert "not a clean git commit" in reuse_refusal(ok, {**ENV, "git_dirty": True})
    assert "not a clean git commit" in reuse_refusal(ok, {**ENV, "git_commit": None, "git_dirty": None})
    other_gpu = {**ENV, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    assert "made on cpu" in reuse_refusal(ok, other_gpu)
    assert "made on cpu (AMD EPYC)" in reuse_refusal({**ok, "env": {**ENV, "device_name": "AMD EPYC"}}, ENV)


def test_a_record_from_another_code_version_is_run_again_and_both_records_are_kept(tmp_path):
    results = tmp_path / "results"
    first = run_cli(*TINY, f"results_dir={results}")
    assert first.returncode == 0, first.stderr[-2000:]
    [path] = results.glob("*.json")
    old = read_record(path)
    old["env"]["git_commit"] = "0" * 40  # as if committed by an older version of the code
    path.write_text(json.dumps(old))

    again = run_cli(*TINY, f"results_dir={results}")
    assert again.returncode == 0, again.stderr[-2000:]
    # the reason: the other commit, or (in a working tree with uncommitted changes) that tree
    assert "commit 0000000000" in again.stdout or "not a clean git commit" in again.stdout, again.stdout[-1000:]
    new = read_record(path)
    assert new["status"] == "ok" and new["created_at"] >= old["created_at"] and new["env"]["git_commit"] != "0" * 40
    [kept] = (results / "superseded").glob("*.json")
    assert read_record(kept) == old and kept.name.startswith(path.stem + ".0000000000.")

    from analysis.load import load_runs

    assert len(load_runs(results)) == 1  # tables read the current record only


def test_a_sweep_prints_the_committed_reference_run_of_the_same_configuration_under_its_own(tmp_path):
    committed = run_cli(*TINY, f"results_dir={tmp_path / 'committed'}")
    assert committed.returncode == 0, committed.stderr[-2000:]
    sweep = run_cli(
        "-m",
        *TINY,
        "seed=0,1",
        f"results_dir={tmp_path / 'mine'}",
        f"reference_results={tmp_path / 'committed'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    lines = sweep.stdout.splitlines()
    rows = [line.split()[0] for line in lines if line.startswith(("lora_bf16", "  reference"))]
    assert rows == ["lora_bf16", "reference", "lora_bf16"]  # seed 1 has no committed run: no reference row
    assert f"the committed records in {tmp_path / 'committed'}" in sweep.stdout


@pytest.mark.slow
def test_a_checkpoint_overwritten_in_place_or_another_mmlu_file_at_its_path_is_another_run(
    tiny_checkpoint_with_bundled_vocab, tmp_path
):
    """The run id names by content what the config names by place: a checkpoint folder overwritten with
    other weights, or another MMLU file at the same path, is never served the old record."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from experiments.assets import MMLU_JSONL, fetch

    folder, mmlu = tmp_path / "checkpoint", tmp_path / "mmlu.jsonl"
    shutil.copytree(tiny_checkpoint_with_bundled_vocab, folder)
    shutil.copy(fetch(MMLU_JSONL), mmlu)
    args = ("model=hf", f"model.name_or_path={folder}", f"mmlu_file={mmlu}", "method=base_bf16", "threads=1",
            "eval.num_fewshot=0", "eval.limit_per_subject=1", "eval.subjects=[anatomy]", "eval.perplexity.seq_len=64",
            "eval.perplexity.max_tokens=128", f"results_dir={tmp_path / 'results'}")  # fmt: skip

    def run_id(name: str) -> str:
        done = run_cli(*args, f"hydra.run.dir={tmp_path / name}")
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((tmp_path / name / "run_pointer.json").read_text())["run_id"]

    first = run_id("first")
    assert run_id("same") == first  # nothing changed: the same run
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(folder)  # other weights, same folder
    overwritten = run_id("overwritten")
    lines = mmlu.read_text().splitlines()
    mmlu.write_text("\n".join(lines[:-1]) + "\n")  # another file at the same path
    assert len({first, overwritten, run_id("other_mmlu")}) == 3


def test_device_auto_and_the_device_auto_picks_here_are_one_run(tmp_path):
    """device=auto and device=cpu on a CPU machine (device=cuda on a GPU node) run the same: one id, one record."""
    ids = []
    for device in ("auto", "cpu"):
        done = run_cli(
            *TINY, f"device={device}", f"results_dir={tmp_path / device}", f"hydra.run.dir={tmp_path / device}"
        )
        assert done.returncode == 0, done.stderr[-2000:]
        ids.append(json.loads((tmp_path / device / "run_pointer.json").read_text())["run_id"])
    assert ids[0] == ids[1]
