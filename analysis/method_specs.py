"""What the memory model needs to know about a method: weight format, bits, block or group size, LoRA.

A ``MethodSpec`` is read from the harness's own ``conf/method/<name>.yaml`` when that file
exists: the method it configures says its format (``methods.base.Method.method_format``),
so a prediction describes exactly what ``experiments.run`` would train and a new method
is covered without an edit here. Otherwise it comes from the built-in formats below, which
cover the hardware table's columns:

- 16-bit LoRA (Hu et al. 2022): the base in bf16/fp16.
- QLoRA (Dettmers et al., arXiv 2305.14314): bitsandbytes NF4/FP4 in blocks of 64, with or
  without double quantization; and LLM.int8 (Dettmers et al., arXiv 2208.07339), the 8-bit
  base that LLaMA-Factory calls "QLoRA 8-bit".
- QA-LoRA (Xu et al., arXiv 2309.14717): INT-k codes with an fp16 scale and zero per group
  of L input channels; the adapter's A acts on group-pooled inputs (r x D_in/L).
- GPTQ (Frantar et al., arXiv 2210.17323) in GPTQModel's packing, for inference only; RTN
  (round-to-nearest) in QA-LoRA's INT-k group format (methods/int_quant.py), no adapters.

The formulas themselves are the registered classes' (methods/registry.py): the weight format says
the bytes of a layer, the adapter its tensors and activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.compute_dtype import storage_dtype
from core.shapes import LLAMA_BLOCK_LINEARS
from experiments.harness.config import CONF
from methods.registry import adapter_class, weight_format

CONF_METHODS = CONF / "method"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    weight_format: str  # a registered WeightFormat's name (methods/registry.py)
    bits: int
    block_size: int | None = None  # bitsandbytes block (4-bit: 64) or quantization group size
    double_quant: bool = False
    lora_rank: int | None = 64  # None: no adapters (inference only)
    lora_targets: tuple[str, ...] = LLAMA_BLOCK_LINEARS
    lora_dropout: float = 0.05
    compute_bytes: int = 2  # bf16/fp16 compute, the dtype of embeddings, norms and head
    adapter_bytes_per_param: int = 4  # peft upcasts 16-bit adapters to fp32 (autocast_adapter_dtype)
    dora: bool = False  # DoRA: a trained magnitude per output row of each adapted layer besides LoRA's A and B
    # The registered adapter kind whose tensors and activations are predicted (methods/registry.py); None:
    # "lora" with a rank, "none" without.
    adapter: str | None = None
    settings: dict[str, Any] = field(default_factory=dict, hash=False)  # the record's method settings (prefix...)

    def __post_init__(self):
        weight_format(self.weight_format)  # a ValueError naming what to declare, if no module declares it
        if self.adapter is None:
            object.__setattr__(self, "adapter", "lora" if self.lora_rank is not None else "none")
        adapter_class(self.adapter)

    @property
    def trainable(self) -> bool:
        return adapter_class(self.adapter).trainable

    def with_lora(
        self, rank: int | None = None, targets: tuple[str, ...] | None = None, dropout: float | None = None
    ) -> MethodSpec:
        return replace(
            self,
            lora_rank=rank if rank is not None else self.lora_rank,
            lora_targets=tuple(targets) if targets else self.lora_targets,
            lora_dropout=dropout if dropout is not None else self.lora_dropout,
        )


BUILTIN_METHODS = {
    "lora_bf16": MethodSpec("lora_bf16", "bf16", 16),
    "lora_fp16": MethodSpec("lora_fp16", "fp16", 16),
    "qlora_int8": MethodSpec("qlora_int8", "int8", 8),
    "qlora_nf4": MethodSpec("qlora_nf4", "nf4", 4, 64),
    "qlora_nf4_dq": MethodSpec("qlora_nf4_dq", "nf4", 4, 64, double_quant=True),
    "qlora_fp4": MethodSpec("qlora_fp4", "fp4", 4, 64),
    # QA-LoRA's paper default group size is 32 (its Table 6 ablates 32..128).
    "qalora_int4": MethodSpec("qalora_int4", "int_group", 4, 32, adapter="qalora"),
    "qalora_int3": MethodSpec("qalora_int3", "int_group", 3, 32, adapter="qalora"),
    "qalora_int2": MethodSpec("qalora_int2", "int_group", 2, 32, adapter="qalora"),
    "gptq_int4": MethodSpec("gptq_int4", "gptq", 4, 128, lora_rank=None),
    "gptq_int3": MethodSpec("gptq_int3", "gptq", 3, 128, lora_rank=None),
    "gptq_int2": MethodSpec("gptq_int2", "gptq", 2, 128, lora_rank=None),
}


def spec_from_format(fmt) -> MethodSpec:
    """A MethodSpec from a method's own ``methods.base.MethodFormat``: what it stores and trains."""
    lora = fmt.lora
    return MethodSpec(
        fmt.name,
        fmt.weight_format,
        fmt.bits,
        fmt.block_size,
        fmt.double_quant,
        lora_rank=lora.r if lora is not None else None,
        lora_targets=lora.target_modules if lora is not None else LLAMA_BLOCK_LINEARS,
        lora_dropout=lora.dropout if lora is not None else 0.05,
        compute_bytes=DTYPE_BYTES[fmt.compute_dtype],
        dora=lora is not None and bool(dict(lora.peft_options).get("use_dora")),
        adapter=fmt.adapter,
        settings=dict(fmt.settings),
    )


def spec_from_method_config(cfg: dict) -> MethodSpec:
    """The MethodSpec of a conf/method/*.yaml: the method built from it (no model is loaded) says its format.

    ``compute_dtype: auto`` is read as on the GPUs this model predicts for: the stored 16-bit
    dtype, or bfloat16 for a quantized base (not as on the machine that runs the prediction).
    """
    import hydra

    cfg = dict(cfg)
    if cfg.get("compute_dtype") == "auto":
        cfg["compute_dtype"] = storage_dtype(cfg) or "bfloat16"
    method = hydra.utils.instantiate(cfg, _convert_="all")
    return spec_from_format(method.method_format())


def resolve_method(name_or_path: str) -> MethodSpec:
    """A method by conf/method name (preferred: the harness's own settings), built-in name, or YAML path."""
    from omegaconf import OmegaConf

    from methods.compose import register_method_name_resolver

    register_method_name_resolver()
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_METHODS / f"{name_or_path}.yaml"
    if path.is_file():
        return spec_from_method_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    if name_or_path in BUILTIN_METHODS:
        return BUILTIN_METHODS[name_or_path]
    known = sorted(set(BUILTIN_METHODS) | {p.stem for p in CONF_METHODS.glob("*.yaml")})
    raise ValueError(f"unknown method {name_or_path!r}: use one of {', '.join(known)} or a method YAML path")
