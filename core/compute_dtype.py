"""``compute_dtype: auto``: compute in bfloat16 where the device does so natively, else in float32.

bfloat16 is the QLoRA paper's compute type and what recent GPUs and CPUs with AVX-512 BF16
or AMX compute at full speed. On an x86 CPU with AVX2 only, PyTorch emulates it: a bf16
matrix product ran about 60x slower than fp32 there (measured, one thread, 512x576 @ 576x1536:
1.2 against 71 GFLOP/s). A GPU without bf16 (before Ampere) computes in float16.
The choice is made once per run, written into the run's config (so the run id and the
tables tell a bf16 run from an fp32 one) and into the record with its reason.
Storage formats are not affected: an NF4 base stays NF4 and a bf16 base stays bf16, only
the dtype its products are computed in changes (methods/upcast.py for a 16-bit base).

On CPUs, bf16 products go through oneDNN; ``ONEDNN_MAX_CPU_ISA`` below ``AVX512_CORE_BF16``
(for example ``AVX2``) keeps it from the bf16 instructions even where the CPU has them, so
the choice honours it too (that is also how an AVX2-only CPU can be imitated on a newer one:
``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``).
"""

from __future__ import annotations

import os

import torch

from core.cpu import cpu_flags

AUTO = "auto"
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN's ISA names (its docs, "CPU Dispatcher Control") that lack native bf16 products.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def native_compute_dtype(
    device: torch.device, flags: set[str] | None = None, onednn_max_isa: str | None = None
) -> tuple[str, str]:
    """(dtype name, why) for ``compute_dtype: auto`` on ``device``."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", f"{torch.cuda.get_device_name(device)} computes bfloat16 natively"
        return "float16", f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(CPU_BF16_FLAGS) & flags)
    if not native:
        return (
            "float32",
            "the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16): bf16 would be emulated, ~60x slower",
        )
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if onednn_max_isa is None else onednn_max_isa).upper()
    if isa in ONEDNN_ISAS_WITHOUT_BF16:
        return "float32", (
            f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN from the CPU's bfloat16 instructions "
            f"({', '.join(native)}): bf16 would be emulated, ~60x slower"
        )
    return "bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})"


def auto_compute_dtype(device: torch.device, storage_dtype: str | None = None) -> tuple[str, str]:
    """(dtype name, why) for ``auto``. A base stored in a 16-bit dtype (``storage_dtype``) computes in
    that dtype where the device does so natively and in float32 otherwise: never in the other 16-bit
    dtype, whose rounding would change the stored weights."""
    if storage_dtype == "float32":  # nothing to gain from rounding a float32 base to 16 bits
        return "float32", "the base is stored in float32"
    name, reason = native_compute_dtype(device)
    if storage_dtype in (None, name):
        return name, reason
    if name == "float32":
        return name, reason
    return "float32", f"{reason}, not {storage_dtype}, the dtype the base is stored in"


# The 16-bit bases of methods/compose.py and the dtype each stores its weights in.
SIXTEEN_BIT_BASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def storage_dtype(method_cfg) -> str | None:
    """The dtype a method config's 16-bit base is stored in (``dtype``, or its ``base`` axis); None if quantized."""
    return method_cfg.get("dtype") or SIXTEEN_BIT_BASES.get(method_cfg.get("base"))


def resolve_auto_compute_dtype(method_cfg, device: torch.device) -> dict | None:
    """Replace ``compute_dtype: auto`` in a method config by the device's choice; returns what was chosen and why."""
    if method_cfg.get("compute_dtype") != AUTO:
        return None
    name, reason = auto_compute_dtype(device, storage_dtype(method_cfg))
    method_cfg.compute_dtype = name
    return {"requested": AUTO, "resolved": name, "reason": reason}
