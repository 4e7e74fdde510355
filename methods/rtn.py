"""Round-to-nearest INT-k group quantization, post-training: the baseline GPTQ must beat.

Asymmetric min-max quantization per group of input channels (methods/int_quant.py),
no calibration data, no fine-tuning. The GPTQ paper (Frantar et al., ICLR 2023) reports
it as "RTN"; it is also QA-LoRA's calibration-free base quantizer.
"""

from __future__ import annotations

from methods.base import LLAMA_BLOCK_LINEARS, LoadContext, dtype_name, load_pretrained, parse_dtype
from methods.int_quant import check_format, check_model_shape
from methods.qalora import quantize_linears_rtn
from methods.storage import trainable_parameters, weight_storage


class RTN:
    trainable = False

    def __init__(self, name: str, bits: int = 4, group_size: int = 128, compute_dtype: str = "bfloat16",
                 target_modules: list[str] | None = None):
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

    def add_adapters(self, model):
        return model

    def finalize(self, model, context: LoadContext):
        return model

    def describe(self, model) -> dict:
        return {
            "name": self.name, "family": "rtn", "quant_format": f"int{self.bits}-g{self.group_size}",
            "bits": self.bits, "group_size": self.group_size, "block_size": self.group_size, "double_quant": False,
            "compute_dtype": self.compute_dtype_name,
            **weight_storage(model, self.target_modules),
            "trainable_params": trainable_parameters(model),
        }
