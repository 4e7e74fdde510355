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


def test_gpu_check_rejects_an_unknown_argument():
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "valid: --dry-run, --out DIR" in done.stderr
