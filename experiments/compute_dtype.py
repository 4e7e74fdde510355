"""``compute_dtype: auto``: compute in bfloat16 where the device does so natively, else in float32.

bfloat16 is the QLoRA paper's compute type and what recent GPUs and CPUs with AVX-512 BF16
or AMX compute at full speed. On an x86 CPU with AVX2 only, PyTorch emulates it: a bf16
matrix product ran about 60x slower than fp32 there (measured, one thread, 512x576 @ 576x1536:
1.2 against 71 GFLOP/s). A GPU without bf16 (before Ampere) computes in float16.
The choice is made once per run, written into the run's config (so the run id and the
tables tell a bf16 run from an fp32 one) and into the record with its reason.
Storage formats are not affected: an NF4 base stays NF4, only its compute dtype changes.
"""

from __future__ import annotations

import torch

from experiments.record import cpuinfo_field

AUTO = "auto"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def native_compute_dtype(device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """(dtype name, why) for ``compute_dtype: auto`` on ``device``."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"{torch.cuda.get_device_name(device)} computes bfloat16 natively"
        return "float16", f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(CPU_BF16_FLAGS) & flags)
    if native:
        return "bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", "the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16): bf16 would be emulated, ~60x slower"


def resolve_auto_compute_dtype(method_cfg, device: torch.device) -> dict | None:
    """Replace ``compute_dtype: auto`` in a method config by the device's choice; returns what was chosen and why."""
    if method_cfg.get("compute_dtype") != AUTO:
        return None
    name, reason = native_compute_dtype(device)
    method_cfg.compute_dtype = name
    return {"requested": AUTO, "resolved": name, "reason": reason}
