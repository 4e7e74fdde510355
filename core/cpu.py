"""What the CPU is: its model name and instruction-set flags, read from /proc/cpuinfo.

CPUs of one cloud machine type differ (AVX2 only, or native bfloat16), and so do their
speeds and bf16 rounding: records name the CPU, and core/compute_dtype.py reads its flags.
"""

from __future__ import annotations

import platform


def cpuinfo_field(name: str) -> str | None:
    """The first CPU's ``name`` field in /proc/cpuinfo ("model name", "flags"), None where there is none."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()
