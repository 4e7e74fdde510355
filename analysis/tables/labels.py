"""How the tables name things: data types, MMLU categories, storage formats and exports; KL divergence's digits."""

from __future__ import annotations

import pandas as pd

from analysis.tables.grouping import MISSING

DATA_TYPE_LABELS = {
    "bfloat16": "BFloat16",
    "float16": "Float16",
    "fp4": "Float4",
    "nf4": "NFloat4",
    "nf4+dq": "NFloat4 + DQ",
}
CATEGORY_LABELS = {
    "humanities": "Hums.",
    "stem": "STEM",
    "social_sciences": "Social",
    "other": "Other",
    "overall": "Avg.",
}
KL_DIGITS = ".3g"  # KL divergence spans 1e-5 (8-bit) to nats (2-bit): significant digits, not decimals


def storage_label(family, quant_format, bits, group_size) -> str:
    """How the fidelity tables name a storage format: "NFloat4", "INT3 RTN g32", "INT4 GPTQ g32"."""
    kinds = {"rtn": "RTN", "gptq": "GPTQ", "qalora": "QA-LoRA", "qlora_gptq": "GPTQ", "hqq": "HQQ"}
    if family in kinds and not pd.isna(bits) and not pd.isna(group_size):
        kind = kinds[family]
        return f"INT{int(bits)} {kind} g{int(group_size)}"
    return DATA_TYPE_LABELS.get(quant_format, quant_format if isinstance(quant_format, str) else MISSING)


def export_label(export: str) -> str:
    return f"GGUF {export.removeprefix('gguf_').upper()}" if export.startswith("gguf_") else export
