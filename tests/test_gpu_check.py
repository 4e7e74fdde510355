"""scripts/gpu_check.sh --dry-run: the GPU check's own code path on CPU, so it cannot rot between GPU leases."""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all steps passed" in done.stdout
    assert "dry run: 1" in (out / "device.txt").read_text()
    report = json.loads((out / "tiny_b1_s32.json").read_text())
    reference = "reference_qlora_nf4"  # paired with the harness's QLoRA NF4 as A B B A, then the others
    assert [r["name"] for r in report["runs"]] == [
        "qlora_nf4",
        reference,
        reference,
        "qlora_nf4",
        "lora_bf16",
        "qlora_nf4_dq",
        "qalora",
    ]
    assert all(r["status"] == "ok" for r in report["runs"])
    assert report["harness_over_reference"] > 0
    assert (out / "tiny_b4_s64_r8.md").exists()
    presets = json.loads((out / "presets" / "presets.json").read_text())  # through the real CLI
    assert [(r["method"], r["status"]) for r in presets["presets"]] == [("lora_bf16", "ok"), ("prefix_bf16", "ok")]
    lora, prefix = presets["presets"]
    assert lora["export"] == "merged_16bit" and lora["export_status"] == "ok" and prefix["export"] is None
    assert all(r["kl_mean_vs_base"] is not None and r["mmlu_n"] == 2 for r in presets["presets"])
    strategies = {r["strategy"]: r for r in presets["strategies"]}
    assert set(strategies) == {"fsdp", "ddp"}  # one rank each, against the single process's losses
    assert all(r["status"] == "ok" and r["losses_max_rel_diff_vs_single"] < 1e-3 for r in strategies.values())
    assert not list((out / "presets").glob("multirun_*/*/exports"))  # scored, then not kept


def test_gpu_check_rejects_an_unknown_argument():
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "valid: --dry-run, --out DIR, --only STEPS" in done.stderr


def test_gpu_check_rejects_an_unknown_step_before_any_work(tmp_path):
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--only", "tests,nccl", "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "unknown step nccl in --only (valid: tests, presets, suite, bench)" in done.stderr
    assert not (tmp_path / "out").exists()
