"""Round-to-nearest INT-k group quantization, post-training: the baseline GPTQ must beat.

Asymmetric min-max quantization per group of input channels (methods/int_quant.py),
no calibration data, no fine-tuning. The GPTQ paper (Frantar et al., ICLR 2023) reports
it as "RTN"; it is also QA-LoRA's calibration-free base quantizer.

This module declares the ``rtn`` base format; its layers' weight format is methods/int_quant.py's.
"""

from __future__ import annotations

from typing import ClassVar

from core.shapes import LLAMA_BLOCK_LINEARS
from methods.base import LoadContext, Method, MethodFormat
from methods.int_quant import check_format, check_model_shape, quantize_linears_rtn
from methods.loading import load_pretrained
from methods.registry import BaseFormat
from methods.settings import dtype_name, parse_dtype


class RTN(Method):
    def __init__(
        self,
        name: str,
        bits: int = 4,
        group_size: int = 128,
        compute_dtype: str = "bfloat16",
        target_modules: list[str] | None = None,
    ):
        check_format(bits, group_size)
        self.name, self.bits, self.group_size = name, bits, group_size
        self.compute_dtype = parse_dtype(compute_dtype, "method.compute_dtype")
        self.compute_dtype_name = dtype_name(self.compute_dtype)  # "auto" resolved: the dtype that runs
        self.target_modules = tuple(target_modules or LLAMA_BLOCK_LINEARS)

    def validate(self, shape: dict):
        check_model_shape(self.bits, self.group_size, shape)

    def load_base(self, model_spec, context: LoadContext):
        model = load_pretrained(model_spec, context.device, self.compute_dtype)
        quantize_linears_rtn(model, self.target_modules, self.bits, self.group_size)
        return model

    def method_format(self) -> MethodFormat:
        return MethodFormat(
            name=self.name,
            family=RTNBase.family,
            quant_format=f"int{self.bits}-g{self.group_size}",
            weight_format="int_group",
            bits=self.bits,
            block_size=self.group_size,
            compute_dtype=self.compute_dtype_name,
            adapter="none",
            settings={"group_size": self.group_size},
        )

    def storage_targets(self) -> tuple[str, ...]:
        return self.target_modules


class RTNBase(BaseFormat):
    """``method.base`` rtn: INT-k groups by round-to-nearest; QA-LoRA (its own Method) trains on it."""

    listed = 3

    names: ClassVar[dict] = {"rtn": {}}
    method = RTN
    takes_peft_adapters = False
    why_no_peft = "peft adapters do not wrap our INT-k layers; the rtn base takes qalora, qat or none"
    family = "rtn"
