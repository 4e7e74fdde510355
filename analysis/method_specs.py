"""What the memory model needs to know about a method: weight format, bits, block or group size, LoRA.

A ``MethodSpec`` is read from the harness's own ``conf/method/<name>.yaml`` when that file
exists (so a prediction describes exactly what ``experiments.run`` would train), and
otherwise from the built-in formats below, which cover the hardware table's columns:

- 16-bit LoRA (Hu et al. 2022): the base in bf16/fp16.
- QLoRA (Dettmers et al., arXiv 2305.14314): bitsandbytes NF4/FP4 in blocks of 64, with or
  without double quantization; and LLM.int8 (Dettmers et al., arXiv 2208.07339), the 8-bit
  base that LLaMA-Factory calls "QLoRA 8-bit".
- QA-LoRA (Xu et al., arXiv 2309.14717): INT-k codes with an fp16 scale and zero per group
  of L input channels; the adapter's A acts on group-pooled inputs (r x D_in/L).
- GPTQ (Frantar et al., arXiv 2210.17323) in GPTQModel's packing, for inference only; RTN
  (round-to-nearest) in QA-LoRA's INT-k group format (methods/int_quant.py), no adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from analysis.model_shapes import BLOCK_LINEARS

CONF_METHODS = Path(__file__).resolve().parent.parent / "conf" / "method"
# compute_dtype "auto" is bfloat16 or float16 on the GPUs this model predicts for (experiments/compute_dtype.py)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
SIXTEEN_BIT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
WEIGHT_FORMATS = ("bf16", "fp16", "fp32", "nf4", "fp4", "int8", "int_group", "gptq")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    weight_format: str  # one of WEIGHT_FORMATS
    bits: int
    block_size: int | None = None  # bitsandbytes block (4-bit: 64) or quantization group size
    double_quant: bool = False
    lora_rank: int | None = 64  # None: no adapters (inference only)
    lora_targets: tuple[str, ...] = BLOCK_LINEARS
    lora_dropout: float = 0.05
    compute_bytes: int = 2  # bf16/fp16 compute, the dtype of embeddings, norms and head
    adapter_bytes_per_param: int = 4  # peft upcasts 16-bit adapters to fp32 (autocast_adapter_dtype)

    def __post_init__(self):
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {self.weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")

    @property
    def trainable(self) -> bool:
        return self.lora_rank is not None

    def with_lora(self, rank: int | None = None, targets: tuple[str, ...] | None = None,
                  dropout: float | None = None) -> "MethodSpec":
        return replace(self, lora_rank=rank if rank is not None else self.lora_rank,
                       lora_targets=tuple(targets) if targets else self.lora_targets,
                       lora_dropout=dropout if dropout is not None else self.lora_dropout)


BUILTIN_METHODS = {
    "lora_bf16": MethodSpec("lora_bf16", "bf16", 16),
    "lora_fp16": MethodSpec("lora_fp16", "fp16", 16),
    "qlora_int8": MethodSpec("qlora_int8", "int8", 8),
    "qlora_nf4": MethodSpec("qlora_nf4", "nf4", 4, 64),
    "qlora_nf4_dq": MethodSpec("qlora_nf4_dq", "nf4", 4, 64, double_quant=True),
    "qlora_fp4": MethodSpec("qlora_fp4", "fp4", 4, 64),
    # QA-LoRA's paper default group size is 32 (its Table 6 ablates 32..128).
    "qalora_int4": MethodSpec("qalora_int4", "int_group", 4, 32),
    "qalora_int3": MethodSpec("qalora_int3", "int_group", 3, 32),
    "qalora_int2": MethodSpec("qalora_int2", "int_group", 2, 32),
    "gptq_int4": MethodSpec("gptq_int4", "gptq", 4, 128, lora_rank=None),
    "gptq_int3": MethodSpec("gptq_int3", "gptq", 3, 128, lora_rank=None),
    "gptq_int2": MethodSpec("gptq_int2", "gptq", 2, 128, lora_rank=None),
}


def _lora_fields(lora: dict | None) -> dict:
    lora = dict(lora or {})
    fields = {"lora_rank": int(lora.get("r", 64)), "lora_dropout": float(lora.get("dropout", 0.05))}
    if lora.get("target_modules"):
        fields["lora_targets"] = tuple(lora["target_modules"])
    return fields


def spec_from_method_config(cfg: dict) -> MethodSpec:
    """Map a conf/method/*.yaml (its ``_target_`` and parameters) onto a MethodSpec."""
    target, name = str(cfg.get("_target_", "")), str(cfg.get("name", "method"))
    if target.endswith("lora.LoRA"):
        dtype = cfg.get("dtype", "bfloat16")
        return MethodSpec(name, SIXTEEN_BIT[dtype], 8 * DTYPE_BYTES[dtype],
                          compute_bytes=DTYPE_BYTES[cfg.get("compute_dtype") or dtype],
                          **_lora_fields(cfg.get("lora")))
    if target.endswith("qlora.QLoRA"):
        return MethodSpec(name, cfg.get("quant_type", "nf4"), 4, 64, bool(cfg.get("double_quant", False)),
                          compute_bytes=DTYPE_BYTES[cfg.get("compute_dtype", "bfloat16")],
                          **_lora_fields(cfg.get("lora")))
    if "qalora" in target.lower():
        group = cfg.get("group_size") or cfg.get("group") or 32
        return MethodSpec(name, "int_group", int(cfg.get("bits", 4)), int(group),
                          compute_bytes=DTYPE_BYTES[cfg.get("compute_dtype", "float16")],
                          **_lora_fields(cfg.get("lora")))
    if target.endswith("rtn.RTN"):  # round-to-nearest into the same INT-k group format, no adapters
        return MethodSpec(name, "int_group", int(cfg.get("bits", 4)), int(cfg.get("group_size", 128)),
                          lora_rank=None, compute_bytes=DTYPE_BYTES[cfg.get("compute_dtype", "bfloat16")])
    if "gptq" in target.lower():
        lora = cfg.get("lora")
        fields = _lora_fields(lora) if lora else {"lora_rank": None}
        return MethodSpec(name, "gptq", int(cfg.get("bits", 4)), int(cfg.get("group_size", 128)), **fields)
    raise ValueError(f"method {name}: the memory model does not know {target!r}")


def resolve_method(name_or_path: str) -> MethodSpec:
    """A method by conf/method name (preferred: the harness's own settings), built-in name, or YAML path."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_METHODS / f"{name_or_path}.yaml"
    if path.is_file():
        return spec_from_method_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    if name_or_path in BUILTIN_METHODS:
        return BUILTIN_METHODS[name_or_path]
    known = sorted(set(BUILTIN_METHODS) | {p.stem for p in CONF_METHODS.glob("*.yaml")})
    raise ValueError(f"unknown method {name_or_path!r}: use one of {', '.join(known)} or a method YAML path")
