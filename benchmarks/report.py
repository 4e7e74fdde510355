"""What a benchmark's report says first (the command, the commit, the CPU and whether it computes bf16
natively, torch, the date) and where it goes: ``<out>/<name>.json`` and ``<out>/<name>.md``."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

GIT_DESCRIBE = ["git", "describe", "--always", "--dirty"]  # the commit, "-dirty" when the tree is not clean


def stamp(name: str, argv: list[str]) -> dict:
    import torch

    from core.compute_dtype import CPU_BF16_FLAGS
    from core.cpu import cpu_flags, cpu_model_name

    return {
        "command": " ".join([f"python -m benchmarks.{name}", *argv]),
        "commit": subprocess.run(GIT_DESCRIBE, capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model_name(),
        "cpu_native_bf16": bool(cpu_flags() & set(CPU_BF16_FLAGS)),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_report(out: str | Path, name: str, report: dict, markdown: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
