"""compute_dtype=auto: bfloat16 where the device computes it natively, float32 on CPUs that emulate it."""

import torch

from experiments.compute_dtype import native_compute_dtype, resolve_auto_compute_dtype
from tests.conftest import compose_config, run_cli

CPU = torch.device("cpu")


def test_a_cpu_with_native_bf16_computes_in_bf16_and_an_avx2_cpu_in_fp32():
    assert native_compute_dtype(CPU, {"avx2", "avx512f", "avx512_bf16"})[0] == "bfloat16"
    assert native_compute_dtype(CPU, {"avx2", "amx_bf16", "amx_tile"})[0] == "bfloat16"
    name, reason = native_compute_dtype(CPU, {"avx2", "fma", "avx512f"})
    assert name == "float32" and "no native bfloat16" in reason


def test_auto_is_written_into_the_config_so_the_run_id_tells_the_dtypes_apart():
    from experiments.run import run_id_of

    cfg = compose_config("method=qlora_nf4")
    assert cfg.method.compute_dtype == "auto"
    choice = resolve_auto_compute_dtype(cfg.method, CPU)
    assert choice["resolved"] == cfg.method.compute_dtype == native_compute_dtype(CPU)[0]
    explicit = compose_config("method=qlora_nf4", f"method.compute_dtype={choice['resolved']}")
    other = "float32" if choice["resolved"] == "bfloat16" else "bfloat16"
    assert run_id_of(cfg) == run_id_of(explicit)  # auto on this machine is that dtype, nothing else
    assert run_id_of(cfg) != run_id_of(compose_config("method=qlora_nf4", f"method.compute_dtype={other}"))
    assert resolve_auto_compute_dtype(compose_config("method=qlora_nf4", "method.compute_dtype=float32").method,
                                      CPU) is None  # what the user fixes stays


def test_the_record_says_which_dtype_ran_and_why(tmp_path):
    done = run_cli("model=llama_synthetic", "method=qlora_nf4", "method.lora.r=4", "train.max_steps=1", "threads=1",
                   f"results_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    from experiments.record import read_record

    [path] = tmp_path.glob("*.json")
    record = read_record(path)
    expected, reason = native_compute_dtype(CPU)
    assert record["config"]["method"]["compute_dtype"] == expected == record["method"]["compute_dtype"]
    assert record["env"]["compute_dtype_choice"] == {"requested": "auto", "resolved": expected, "reason": reason}
