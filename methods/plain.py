"""The base model as it is, in 16 bits: no quantization, no adapters, no fine-tuning.

The reference row of the QA-LoRA paper's Table 1 ("LLaMA-7B") and of the data-type
tables: every other method's accuracy and perplexity is read against it.

This module also declares the 16-bit base format (``bf16``, ``fp16``, ``fp32``): ``Plain`` without
an adapter, ``methods.lora.LoRA`` with one, its weights stored as they are.
"""

from __future__ import annotations

from typing import ClassVar

from core.compute_dtype import SIXTEEN_BIT_BASES
from core.shapes import LLAMA_BLOCK_LINEARS
from methods.base import LoadContext, Method, MethodFormat
from methods.loading import load_16bit
from methods.lora import SIXTEEN_BIT_FORMATS, LoRA
from methods.registry import BaseFormat, WeightFormat
from methods.settings import dtype_name, parse_16bit_compute_dtype, parse_dtype


class Plain(Method):
    def __init__(
        self,
        name: str,
        dtype: str = "bfloat16",
        compute_dtype: str | None = None,
        target_modules: list[str] | None = None,
    ):
        self.name, self.dtype_name = name, dtype
        self.dtype = parse_dtype(dtype, "method.dtype")
        self.compute_dtype = parse_16bit_compute_dtype(compute_dtype, dtype)  # "auto" resolved: the dtype that runs
        self.target_modules = tuple(target_modules or LLAMA_BLOCK_LINEARS)

    def load_base(self, model_spec, context: LoadContext):
        return load_16bit(model_spec, context.device, self.dtype, self.compute_dtype)

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=SixteenBitBase.family,
            quant_format=self.dtype_name,
            weight_format=SIXTEEN_BIT_FORMATS[self.dtype_name],
            bits={"float32": 32}.get(self.dtype_name, 16),
            compute_dtype=dtype_name(self.compute_dtype),
            adapter="none",
        )

    def storage_targets(self) -> tuple[str, ...]:
        return self.target_modules


class DenseWeights(WeightFormat):
    """Weights stored as they are: 2 or 4 bytes each, no constants. Its layers are plain ``nn.Linear``,
    which storage and merge read without a declaration; only the method's targets count as its linears."""

    names = tuple(SIXTEEN_BIT_FORMATS.values())  # bf16, fp16, fp32
    dense = True

    @classmethod
    def layer_bytes(cls, d_in, d_out, spec):
        return d_in * d_out * spec.bits // 8, 0


class SixteenBitBase(BaseFormat):
    """``method.base`` bf16, fp16, fp32: the checkpoint's weights in that dtype; every peft adapter attaches."""

    listed = 0

    names: ClassVar[dict] = {base: {"dtype": dtype} for base, dtype in SIXTEEN_BIT_BASES.items()}
    method = LoRA
    quantized = False
    family, trained_family = "base", "lora"

    @classmethod
    def method_class(cls, adapter):
        return Plain if adapter.kind == "none" else LoRA
