"""compute_dtype=auto: bfloat16 where the device computes it natively, float32 on CPUs that emulate it."""

import math

import torch

from core.compute_dtype import native_compute_dtype, resolve_auto_compute_dtype
from tests.conftest import compose_config, run_cli

CPU = torch.device("cpu")


def test_a_cpu_with_native_bf16_computes_in_bf16_and_an_avx2_cpu_in_fp32():
    assert native_compute_dtype(CPU, {"avx2", "avx512f", "avx512_bf16"}, onednn_max_isa="")[0] == "bfloat16"
    assert native_compute_dtype(CPU, {"avx2", "amx_bf16", "amx_tile"}, onednn_max_isa="")[0] == "bfloat16"
    name, reason = native_compute_dtype(CPU, {"avx2", "fma", "avx512f"}, onednn_max_isa="")
    assert name == "float32" and "no native bfloat16" in reason


def test_onednn_kept_below_bf16_instructions_computes_in_fp32():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 (measured: ~2.5 against ~100 GFLOP/s fp32) on any CPU."""
    name, reason = native_compute_dtype(CPU, {"avx2", "amx_bf16"}, onednn_max_isa="avx2")
    assert name == "float32" and "ONEDNN_MAX_CPU_ISA=AVX2" in reason
    assert native_compute_dtype(CPU, {"avx2", "amx_bf16"}, onednn_max_isa="AVX512_CORE_AMX")[0] == "bfloat16"


def test_a_16bit_base_computes_in_its_own_dtype_or_in_fp32_never_the_other_16bit_one(monkeypatch):
    import core.compute_dtype as compute_dtype

    for native, stored, expected in [
        ("bfloat16", "bfloat16", "bfloat16"),
        ("float32", "bfloat16", "float32"),
        ("float16", "bfloat16", "float32"),
        ("bfloat16", "float16", "float32"),
        ("float16", "float16", "float16"),
        ("bfloat16", None, "bfloat16"),
        ("bfloat16", "float32", "float32"),  # a float32 base (method.base=fp32) is not rounded to 16 bits
    ]:
        monkeypatch.setattr(compute_dtype, "native_compute_dtype", lambda device, native=native: (native, "stub"))
        assert compute_dtype.auto_compute_dtype(CPU, stored)[0] == expected, (native, stored)


def test_auto_is_written_into_the_config_so_the_run_id_tells_the_dtypes_apart():
    from experiments.harness.record import run_id_of

    cfg = compose_config("method=qlora_nf4")
    assert cfg.method.compute_dtype == "auto"
    choice = resolve_auto_compute_dtype(cfg.method, CPU)
    assert choice["resolved"] == cfg.method.compute_dtype == native_compute_dtype(CPU)[0]
    explicit = compose_config("method=qlora_nf4", f"method.compute_dtype={choice['resolved']}")
    other = "float32" if choice["resolved"] == "bfloat16" else "bfloat16"
    assert run_id_of(cfg) == run_id_of(explicit)  # auto on this machine is that dtype, nothing else
    assert run_id_of(cfg) != run_id_of(compose_config("method=qlora_nf4", f"method.compute_dtype={other}"))
    assert (
        resolve_auto_compute_dtype(compose_config("method=qlora_nf4", "method.compute_dtype=float32").method, CPU)
        is None
    )  # what the user fixes stays


def test_the_record_says_which_dtype_ran_and_why(tmp_path):
    done = run_cli(
        "model=llama_synthetic",
        "method=qlora_nf4",
        "method.lora.r=4",
        "train.max_steps=1",
        "threads=1",
        f"results_dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from experiments.harness.record import read_record

    [path] = tmp_path.glob("*.json")
    record = read_record(path)
    expected, reason = native_compute_dtype(CPU)
    assert record["config"]["method"]["compute_dtype"] == expected == record["method"]["compute_dtype"]
    assert record["env"]["compute_dtype_choice"] == {"requested": "auto", "resolved": expected, "reason": reason}


def _lora(dtype, compute_dtype=None):
    from methods.lora import LoRA

    return LoRA("lora", dtype=dtype, compute_dtype=compute_dtype, lora={"r": 4, "dropout": 0.0})


def test_a_bf16_base_computing_in_fp32_stays_bf16_and_trains_as_its_fp32_upcast(tiny_spec):
    """LoRA on a bf16 base where bf16 is emulated: the stored weights stay bf16 (the method's bytes), and
    loss, logits and adapter gradients are exactly those of the same bf16 weights cast to fp32 beforehand."""
    from methods.base import LoadContext

    context = LoadContext(CPU)
    upcast = _lora("bfloat16", "float32")
    model = upcast.add_adapters(upcast.load_base(tiny_spec, context))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    description = upcast.describe(model)
    assert description["compute_dtype"] == "float32" and description["quant_format"] == "bfloat16"

    reference = _lora("float32")
    ref_base = reference.load_base(tiny_spec, context)
    for ref_param, param in zip(ref_base.parameters(), upcast.load_base(tiny_spec, context).parameters()):
        ref_param.data.copy_(param.data.float())  # the same bf16 values, held in fp32
    ref_model = reference.add_adapters(ref_base)
    ref_model.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)

    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
        out = model(input_ids=tokens, labels=tokens)
    ref_out = ref_model(input_ids=tokens, labels=tokens)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=0)
    out.loss.backward()
    ref_out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, param in ref_model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=0)
    # Backward keeps the stored bf16 weights, never a float32 copy of one.
    weight_shapes = {p.shape for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    assert not [s for dtype, s in saved if dtype == torch.float32 and s in weight_shapes]


def test_a_16bit_base_rejects_the_other_16bit_compute_dtype():
    import pytest

    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="computes in bfloat16, float32 or auto"):
        _lora("bfloat16", "float16")


def test_lora_bf16_on_a_cpu_emulating_bf16_runs_in_fp32_and_says_why(tmp_path):
    """The README's main job on an AVX2-only CPU, imitated with oneDNN and MKL kept to AVX2."""
    import os
    import subprocess
    import sys

    from experiments.harness.record import read_record
    from tests.conftest import REPO

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "HYDRA_FULL_ERROR": "0"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "model=llama_synthetic",
            "method=lora_bf16",
            "method.lora.r=4",
            "train.max_steps=2",
            "threads=1",
            "eval.limit_per_subject=1",
            "eval.subjects=[anatomy]",
            f"results_dir={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [path] = tmp_path.glob("*.json")
    record = read_record(path)
    assert record["status"] == "ok"
    assert record["config"]["method"]["compute_dtype"] == record["method"]["compute_dtype"] == "float32"
    assert (
        "ONEDNN_MAX_CPU_ISA=AVX2" in record["env"]["compute_dtype_choice"]["reason"]
        or "no native bfloat16" in record["env"]["compute_dtype_choice"]["reason"]
    )
    assert record["method"]["quant_format"] == "bfloat16"
    assert record["method"]["weight_bits_per_param"] == 16
    assert all(math.isfinite(loss) for loss in record["train"]["losses"])
