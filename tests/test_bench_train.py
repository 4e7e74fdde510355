"""The GPU throughput benchmark (benchmarks/bench_train.py): its CPU smoke mode, and its refusal without CUDA."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_train
from tests.conftest import REPO


def test_smoke_mode_runs_every_method_and_the_reference_on_tiny(tmp_path):
    report = bench_train.main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--seq",
            "16",
            "--rank",
            "4",
            "--methods",
            "lora_bf16",
            "qlora_nf4_dq",
            "--out",
            str(tmp_path),
        ]
    )
    names = [r["name"] for r in report["runs"]]
    assert names == ["lora_bf16", "qlora_nf4_dq", bench_train.REFERENCE]
    for run in report["runs"]:
        assert run["status"] == "ok", run
        assert run["tokens_per_second"] > 0
        assert run["predicted"]["peak_allocated_bytes"] > run["predicted"]["floor_allocated_bytes"] > 0
    written = json.loads((tmp_path / "tiny_b1_s16_r4.json").read_text())
    assert written["settings"]["gradient_checkpointing"] is True
    assert "| qlora_nf4_dq | ok |" in (tmp_path / "tiny_b1_s16_r4.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_refuses_to_run_without_cuda_with_a_clear_message():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--preset tiny --device cpu" in done.stderr
