"""The real-data training benchmark (benchmarks/bench_packing.py): its bare transformers + peft loop trains
the same model from the same start on the same batches as the harness's plain setting, so their tokens/s
compare the training step alone."""

import argparse

import pytest
import torch

from benchmarks import bench_packing


@pytest.mark.slow
def test_the_bare_loop_has_the_harness_plain_losses_and_counts_the_same_real_tokens():
    args = argparse.Namespace(methods=["lora_bf16"], steps=3, warmup=1, device="cpu", no_bare=False, out=None)
    data = bench_packing.load_data(args)
    cpu = torch.device("cpu")
    plain = bench_packing.run_one("lora_bf16", "plain", args, cpu, data)
    bare = bench_packing.run_one("lora_bf16", bench_packing.BARE, args, cpu, data)
    assert bare["tokens"] == plain["tokens"] and bare["padded_tokens"] == plain["padded_tokens"] > 0
    assert bare["losses"] == pytest.approx(plain["losses"], rel=2e-3)  # same start, same batches, same steps
    assert bare["compute_dtype"] == plain["compute_dtype"]


def test_the_schedule_runs_each_setting_there_and_back_and_liger_on_cuda_only():
    cpu = bench_packing.order(torch.device("cpu"), bare=True)
    assert cpu == ["plain", "packed", "packed_chunked", "bare", "bare", "packed_chunked", "packed", "plain"]
    assert "packed_liger" in bench_packing.order(torch.device("cuda"), bare=False)
