"""No stale results: a record stands for a run only if made by the same clean commit on the same kind of
device; otherwise the run is done again and the old record is kept under superseded/, never destroyed."""

import json

from experiments.record import read_record, reuse_refusal
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
