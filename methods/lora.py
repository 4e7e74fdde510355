"""LoRA on a 16-bit base (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).

The frozen base is kept in a 16-bit dtype (bfloat16 or float16, selectable); peft adds
trainable low-rank adapters B @ A to every target linear layer. This is the baseline
of the QLoRA paper's Table 4 ("BFloat16"). Everything here is peft's; we only wire it.
"""

from __future__ import annotations

from methods.base import (LoadContext, LoraSettings, add_lora, dtype_name, load_16bit, parse_16bit_compute_dtype,
                          parse_dtype)
from methods.storage import trainable_parameters, weight_storage


class LoRA:
    trainable = True

    def __init__(self, name: str, dtype: str = "bfloat16", compute_dtype: str | None = None,
                 lora: dict | None = None):
        self.name = name
        self.dtype_name = dtype
        self.dtype = parse_dtype(dtype, "method.dtype")
        self.compute_dtype = parse_16bit_compute_dtype(compute_dtype, dtype)  # "auto" resolved: the dtype that runs
        self.lora = LoraSettings.from_config(lora)

    def load_base(self, model_spec, context: LoadContext):
        return load_16bit(model_spec, context.device, self.dtype, self.compute_dtype)

    def add_adapters(self, model):
        return add_lora(model, self.lora)

    def finalize(self, model, context: LoadContext):
        return model  # adapters stay separate: evaluation sees base + B @ A exactly

    def describe(self, model) -> dict:
        return {
            "name": self.name,
            "family": "lora",
            "quant_format": self.dtype_name,
            "bits": 16 if self.dtype_name != "float32" else 32,
            "block_size": None,
            "double_quant": False,
            "compute_dtype": dtype_name(self.compute_dtype),
            "lora": self.lora.as_dict(),
            **weight_storage(model, self.lora.target_modules),
            "trainable_params": trainable_parameters(model),
        }
